# temporary: the BRIEF's core interface on today's metrics.py (not committed)
import dataclasses
from sigtrace import metrics as m
@dataclasses.dataclass
class HistogramValue:
    counts: list
    sum: float
    exemplars: list
def snapshot(self):
    with self._lock:
        items = list(self._children.items())
    out = []
    for values, child in items:
        if self.kind == "counter":
            out.append((values, child.get()))
        else:
            counts, total = child.snapshot()
            if sum(counts):
                out.append((values, HistogramValue(counts, total, list(child._exemplars))))
    return out
def reset(self):
    for f in self.families:
        with f._lock:
            f._children.clear()
if not hasattr(m.Family, "snapshot"):
    m.Family.snapshot = snapshot
    m.MetricSet.reset = reset
    m.HistogramValue = HistogramValue
    m.multiprocess_mode = lambda: False
