"""The proxy's node table (issue: `lm serve proxy`): which api_servers there are, what models each serves, how each
is doing (ready, suspect, down, from health probes and request outcomes), how many requests each is answering,
and which node a request goes to. No HTTP here: the proxy's app drives it, and the tests drive it directly.

Health: a node is ready until `fail_after` consecutive failures (probes or requests) make it down; one failure
makes it suspect (still used, last). A down node is not used; after `pass_after` consecutive good probes it is
ready again. A failure also opens the node's circuit for `open_for` seconds: no request is sent to it meanwhile.

Routing strategies: least outstanding requests (counted at dispatch, released when the answer ends; ties broken
at random), random, round robin, and prefix-aware: a prompt whose start was last sent to node N goes to N again
(its prefix cache holds that start), unless N answers `balance` more requests than the least loaded node; then,
and for prompts with no known start, least outstanding. A node answering `limit` requests takes no more (the
proxy queues them). The table persists as JSON (the nodes' URLs) across restarts."""

import hashlib
import json
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

STRATEGIES = ("least_outstanding", "random", "round_robin", "prefix_aware")
READY, SUSPECT, DOWN = "ready", "suspect", "down"


@dataclass
class Node:
    url: str
    models: list = field(default_factory=list)
    state: str = READY
    outstanding: int = 0
    failures: int = 0  # in a row
    passes: int = 0  # good probes in a row while down
    open_until: float = 0.0  # the circuit: no requests before this (time.monotonic())
    requests: int = 0
    errors: int = 0
    instance: Optional[str] = None  # the api_server process's id from /health: a new one means it restarted

    def status(self) -> dict:
        return {"url": self.url, "models": list(self.models), "state": self.state, "outstanding": self.outstanding,
                "requests": self.requests, "errors": self.errors}


def prefix_keys(text: str, chunk: int = 64) -> list:
    """Keys of the text's whole chunks, each naming everything before its end: two texts share their first k keys
    exactly when they share their first k chunks."""
    keys, h = [], hashlib.blake2b(digest_size=16)
    data = text.encode()
    for end in range(chunk, len(data) + 1, chunk):
        h.update(data[end - chunk:end])
        keys.append(h.copy().digest())
    return keys


class Prefixes:
    """Which node each known prompt start was last sent to; the least recently used starts are forgotten past
    `capacity` keys."""

    def __init__(self, capacity: int = 200_000):
        self.capacity, self.owner = capacity, OrderedDict()

    def match(self, keys: list) -> Optional[str]:
        """The node of the longest known start of these keys."""
        url = None
        for key in keys:
            found = self.owner.get(key)
            if found is None:
                break
            url = found
        return url

    def record(self, keys: list, url: str) -> None:
        for key in keys:
            self.owner[key] = url
            self.owner.move_to_end(key)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)


class Nodes:
    def __init__(self, strategy: str = "least_outstanding", fail_after: int = 3, pass_after: int = 2,
                 open_for: float = 5.0, path: Optional[Path] = None, clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, limit: int = 0, balance: int = 8):
        if strategy not in STRATEGIES:
            raise ValueError(f"routing strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        self.strategy, self.fail_after, self.pass_after, self.open_for = strategy, fail_after, pass_after, open_for
        self.path, self.clock, self.rng = path, clock, rng or random.Random()
        self.limit, self.balance = limit, balance  # limit: requests a node answers at once (0: no limit)
        self.prefixes = Prefixes()
        self.nodes: dict[str, Node] = {}
        self.turn = 0  # round robin's position
        if path is not None and path.exists():
            for url in json.loads(path.read_text()).get("nodes", []):
                self.nodes[url] = Node(url)

    def add(self, url: str, models: Optional[list] = None) -> Node:
        url = url.rstrip("/")
        node = self.nodes.setdefault(url, Node(url))
        if models is not None:
            node.models = list(models)
        self._save()
        return node

    def remove(self, url: str) -> bool:
        found = self.nodes.pop(url.rstrip("/"), None) is not None
        self._save()
        return found

    def models(self) -> list:
        """Every model some usable node serves, each once, in the order first seen."""
        seen = {}
        for node in self.nodes.values():
            if node.state != DOWN:
                seen.update((m, None) for m in node.models)
        return list(seen)

    def usable(self, model: Optional[str] = None, exclude: tuple = ()) -> list:
        """Nodes that could take a request for `model` now or once they have room: not down, circuit closed, not
        in exclude (a retry's earlier nodes)."""
        now = self.clock()
        return [n for n in self.nodes.values() if n.state != DOWN and n.open_until <= now
                and n.url not in exclude and (model is None or model in n.models)]

    def has_room(self, node: Node) -> bool:
        return not self.limit or node.outstanding < self.limit

    def pick(self, model: Optional[str] = None, exclude: tuple = (), keys: list = ()) -> Optional[Node]:
        """The node for a request (for `model`, if given; keys: its prompt's prefix_keys, for prefix_aware), by
        the strategy, among the usable nodes with room: ready nodes first, suspect ones only when no ready node
        serves it. None: no node can take it now."""
        usable = [n for n in self.usable(model, exclude) if self.has_room(n)]
        ready = [n for n in usable if n.state == READY]
        candidates = ready or usable
        if not candidates:
            return None
        if self.strategy == "random":
            return self.rng.choice(candidates)
        if self.strategy == "round_robin":
            self.turn += 1
            return candidates[self.turn % len(candidates)]
        least = min(n.outstanding for n in candidates)
        node = None
        if self.strategy == "prefix_aware" and keys:
            node = self.nodes.get(self.prefixes.match(keys) or "")
            if node not in candidates or node.outstanding > least + self.balance:
                node = None
        node = node or self.rng.choice([n for n in candidates if n.outstanding == least])
        if self.strategy == "prefix_aware" and keys:
            self.prefixes.record(keys, node.url)
        return node

    def dispatched(self, node: Node) -> None:
        node.outstanding += 1
        node.requests += 1

    def released(self, node: Node) -> None:
        """A dispatched request that was never sent."""
        node.outstanding = max(0, node.outstanding - 1)
        node.requests -= 1

    def finished(self, node: Node, ok: bool) -> None:
        """A request's answer ended (ok: no connection error, 5xx or 429 from the node)."""
        node.outstanding = max(0, node.outstanding - 1)
        if ok:
            self.succeeded(node)
        else:
            node.errors += 1
            self.failed(node)

    def failed(self, node: Node) -> None:
        """A failed probe or request: suspect at once, down after fail_after in a row; the circuit opens."""
        node.failures += 1
        node.passes = 0
        node.open_until = self.clock() + self.open_for
        node.state = DOWN if node.failures >= self.fail_after else SUSPECT

    def succeeded(self, node: Node) -> None:
        """A good probe or request: a suspect node is ready again; a down one after pass_after good probes."""
        node.failures = 0
        if node.state == DOWN:
            node.passes += 1
            if node.passes < self.pass_after:
                return
        node.state, node.passes, node.open_until = READY, 0, 0.0

    def status(self) -> list:
        return [n.status() for n in self.nodes.values()]

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"nodes": list(self.nodes)}, indent=1) + "\n")
