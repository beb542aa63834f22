"""The proxy's /metrics in Prometheus text format: each node's state, load, requests and errors (read from the node
table when scraped), latencies per node, the admission queue, and the requests the proxy refused itself."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmcli.serve.metrics import LATENCY_BUCKETS
from lmcli.serve.nodes import DOWN, READY, SUSPECT


class NodesCollector:
    def __init__(self, proxy):
        self.proxy = proxy

    def collect(self):
        nodes = list(self.proxy.nodes.nodes.values())
        state = GaugeMetricFamily("lm_proxy_node_state", "1 for the node's health state (ready, suspect, down).",
                                  labels=["node", "state"])
        outstanding = GaugeMetricFamily("lm_proxy_node_outstanding", "Requests the node is answering now.",
                                        labels=["node"])
        requests = CounterMetricFamily("lm_proxy_node_requests", "Requests sent to the node.", labels=["node"])
        errors = CounterMetricFamily("lm_proxy_node_errors", "Requests the node failed (connection error, 429, 5xx).",
                                     labels=["node"])
        for n in nodes:
            for s in (READY, SUSPECT, DOWN):
                state.add_metric([n.url, s], float(n.state == s))
            outstanding.add_metric([n.url], n.outstanding)
            requests.add_metric([n.url], n.requests)
            errors.add_metric([n.url], n.errors)
        yield from (state, outstanding, requests, errors)
        yield GaugeMetricFamily("lm_proxy_queue_length", "Requests waiting for a node with room.", self.proxy.queued)
        yield GaugeMetricFamily("lm_proxy_sessions", "Interactive sessions the proxy routes to their node.",
                                len(self.proxy.sessions))


class ProxyMetrics:
    def __init__(self, proxy):
        self.registry = r = CollectorRegistry()
        r.register(NodesCollector(proxy))
        self.first_byte = Histogram("lm_proxy_first_byte_seconds", "From sending a request to a node to its answer's "
                                    "headers.", ["node"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lm_proxy_request_seconds", "From sending a request to a node to the end of its "
                                 "answer.", ["node"], buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("lm_proxy_retries", "Requests sent again to another node before their first byte.",
                               registry=r)
        self.refused = Counter("lm_proxy_refused", "Requests the proxy answered with an error itself, by reason.",
                               ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
