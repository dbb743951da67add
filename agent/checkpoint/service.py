"""TEMPORARY interface placeholder; replaced by the checkpoint writer service."""
from __future__ import annotations

from typing import Any

import anyio

from flightlog.proto.events import Reply


class CheckpointService:
    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def busy(self) -> bool:
        return False

    async def run(self) -> None:
        await anyio.sleep_forever()

    async def handle(self, msg: Any) -> Reply:
        return Reply(ok=False, error="checkpoint writer not built yet")
