"""`python -m flightlog.agent`: the agent process (the SDK starts it this way as a sidecar)."""
import sys

from flightlog.agent.cli import main

if __name__ == "__main__":
    sys.exit(main(["agent", *sys.argv[1:]]))
