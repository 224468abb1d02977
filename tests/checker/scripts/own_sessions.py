"""A script that opens its own fake sessions (as the README does), run under the checker."""

import torch

import streamkit as sk
from streamkit import fake

side = sk.Stream()

with fake.session(detect="record") as s:
    y = torch.ones(8, device=sk.device())
    y.add_(1)  # <record-write>
    with sk.switch(side):
        z = y * 2  # <record-read>
    print("record block races:", len(s.races), s.races[0].second.lineno if s.races else None)
    try:
        with fake.session():
            pass
    except sk.StreamkitError as exc:
        print("nested:", "don't nest" in str(exc))
print("after the block:", len(s.races), s.closed, s.stats.kernels)

try:
    with fake.session(detect="raise"):
        w = torch.ones(8, device=sk.device())
        w.add_(1)
        with sk.switch(side):
            v = w * 3  # <raise-read>
except fake.RaceError as exc:
    print("raised:", exc.race.second.lineno)

with fake.session(detect="raise") as clean:
    u = torch.ones(8, device=sk.device())
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        total = u.sum()
    sk.current_stream().wait_stream(side)
    print("clean block:", total.item(), len(clean.races), clean.stats.host_syncs)

other = sk.Stream()
a = torch.ones(16, device=sk.device())
other.wait_stream(sk.current_stream())
with sk.switch(other):
    b = a.sum()  # <unjoined-read>
print("done")  # <last>
