"""Reads a run's logs folder as TensorBoard does: prints JSON with every scalar per tag (as
EventAccumulator keeps them, after its purge of steps a resumed attempt redid), the raw step range of
each event file, and the size and curves of logs/loss.svg."""
import json
import os
import sys
import xml.etree.ElementTree as ET

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

logs = sys.argv[1]
tb = os.path.join(logs, "tensorboard")
acc = EventAccumulator(tb, size_guidance={"scalars": 0})
acc.Reload()
scalars = {
    tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
}
files = []
for name in sorted(os.listdir(tb)):
    steps = [
        e.step
        for e in EventFileLoader(os.path.join(tb, name)).Load()
        if e.HasField("summary")
    ]
    starts = [
        e.step
        for e in EventFileLoader(os.path.join(tb, name)).Load()
        if e.HasField("session_log")
    ]
    files.append({"name": name, "steps": steps, "session_starts": starts})
plot = None
svg = os.path.join(logs, "loss.svg")
if os.path.exists(svg):
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    plot = {
        "tag": root.tag,
        "width": int(root.get("width")),
        "height": int(root.get("height")),
        "polylines": [len(p.get("points").split()) for p in root.iter(ns + "polyline")],
    }
print(json.dumps({"scalars": scalars, "files": files, "plot": plot}))
