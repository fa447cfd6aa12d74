"""Building the routing state of a worker from the configuration, and applying a HUP to it.

The shared files live in the run directory (``ntonix.config.handover.run_dir()``), so every worker of
one gateway finds the same ones: ``routing-load`` (in-flight counts, limits, queue) and
``routing-index`` (the prefix index, sized by ``routing.prefix_index_entries`` at start).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from ntonix.config.model import Config
from ntonix.core.prompt import prompt_blocks
from ntonix.core.routing import PrefixSettings, Router
from ntonix.routing.index import PrefixIndex
from ntonix.routing.load import HostLoad
from ntonix.routing.select import Selector, Target

__all__ = ["RoutingState"]


class RoutingState:
    """A worker's selector plus what it needs from the configuration; ``apply`` on HUP."""

    def __init__(self, cfg: Config, directory: str, *, sleep: Callable[[float], object] = time.sleep) -> None:
        """``sleep``: how a waiting request pauses (``gevent.sleep`` in a worker; patched time.sleep is the same)."""
        r = cfg.routing
        load = HostLoad(os.path.join(directory, "routing-load"), sleep=sleep)
        index = PrefixIndex(os.path.join(directory, "routing-index"), entries=r.prefix_index_entries)
        self.selector = Selector(Router(r.policy), load, index, r.queue_timeout_s,
                                 retry_after_s=max(1, round(cfg.health.interval_s)))
        self.block_chars = r.prefix_block_chars
        self.apply(cfg)

    def apply(self, cfg: Config) -> None:
        """Take a (re)loaded configuration: policy, tuning, weights; kept backends keep their state."""
        r = cfg.routing
        self.selector.router.configure(
            r.policy, PrefixSettings(r.prefix_balance_factor, r.prefix_load_blocks),
            backends=[(b.address, b.weight) for b in cfg.backends])
        self.selector.queue_timeout_s = r.queue_timeout_s
        self.selector.retry_after_s = max(1, round(cfg.health.interval_s))
        self.block_chars = r.prefix_block_chars
        self.targets = {b.address: Target(b.address, b.weight, b.max_in_flight) for b in cfg.backends}

    def blocks(self, body: object, partition: bytes | str) -> list[int]:
        """The prompt blocks of a parsed request body; [] unless the policy is ``prefix``."""
        if self.selector.router.policy != "prefix":
            return []
        return prompt_blocks(body, partition=partition, block_chars=self.block_chars)

    def merge(self, blocks: Sequence[int], address: str) -> None:
        """Another gateway sent a prompt holding ``blocks`` to ``address`` (ntonix/cluster/affinity.py,
        merged in the background): this host's index learns it; a backend not configured here is ignored."""
        if address in self.targets and self.selector.index is not None:
            self.selector.index.record(blocks, address)

    def close(self) -> None:
        self.selector.load.close()
        if self.selector.index is not None:
            self.selector.index.close()
