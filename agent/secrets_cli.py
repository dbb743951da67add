"""``flightlog secrets set NAME`` (the value from stdin, never from the command line, where ``ps`` shows it),
``flightlog secrets ls`` (names only) and ``flightlog secrets rm NAME``."""
from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from flightlog.proto.errors import SecretError
from flightlog.proto.secrets import check_name, secret_store

__all__ = ["add_subparsers"]

_MAX_VALUE = 64 << 10


def add_subparsers(sub: Any) -> None:
    s = sub.add_parser("secrets", help="credentials for the backends (referenced as ${secret:NAME} in configs)")
    ssub = s.add_subparsers(dest="secrets_command", required=True)
    st = ssub.add_parser("set", help="store a secret read from stdin (a prompt on a terminal)")
    st.add_argument("name")
    st.set_defaults(func=_set)
    ls = ssub.add_parser("ls", help="list the names of the stored secrets (never their values)")
    ls.set_defaults(func=_ls)
    rm = ssub.add_parser("rm", help="delete a secret")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)


def _read_value(name: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(f"value of secret {name}: ")
    value = sys.stdin.read(_MAX_VALUE + 1)
    if len(value) > _MAX_VALUE:
        raise SecretError(f"the value of secret {name} is over {_MAX_VALUE} bytes")
    return value[:-1] if value.endswith("\n") else value  # `echo x |` and here-strings add one newline


def _set(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    value = _read_value(name)
    if not value:
        raise SecretError(f"no value for secret {name} on stdin: pipe it in (e.g. `pass show x | flightlog "
                          f"secrets set {name}`) or type it at the prompt")
    store = secret_store()
    store.set(name, value)
    print(f"secret {name} stored in {store.where}; reference it as ${{secret:{name}}}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    for name in secret_store().names():
        print(name)
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = secret_store()
    if not store.delete(args.name):
        print(f"flightlog: no secret {args.name} in {store.where}", file=sys.stderr)
        return 1
    print(f"secret {args.name} removed from {store.where}")
    return 0
