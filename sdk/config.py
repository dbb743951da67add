"""``flightlog.config``: the configuration a training script passes (the Structs and the loader live in the
shared core, ``flightlog.proto.config``, so the agent decodes a run's config into the same types)."""
from flightlog.proto.config import *  # noqa: F403
from flightlog.proto.config import __all__  # noqa: F401
