"""Distillation under DDP: 2 CPU processes (gloo, started by torchrun) end with identical student weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from ReCoKDLib.checkpoint import safe_torch_load
from ReCoKDLib.networks import build_unet, preset

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from types import SimpleNamespace

    import numpy as np
    import torch

    from ReCoKDLib.checkpoint import ModelCard
    from ReCoKDLib.data.sampling import CaseArrays, CaseSet
    from ReCoKDLib.engine import TrainConfig, distill
    from ReCoKDLib.networks import build_unet, encoder_tap_names, preset
    from ReCoKDLib.progress import Reporter

    out = sys.argv[1]
    rank = int(os.environ["RANK"])

    def case(seed):
        rng = np.random.default_rng(seed)
        label = np.zeros((1, 24, 32, 32), np.int16)
        c = rng.integers(8, 16, 3)
        label[0, c[0] - 4:c[0] + 4, c[1] - 5:c[1] + 5, c[2] - 5:c[2] + 5] = 1
        label[0, c[0] - 1:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = 2
        image = (label + rng.normal(0.0, 0.5, label.shape)).astype(np.float32)
        return CaseArrays(f"c{seed}", image, label)

    cases = CaseSet([case(0), case(1)], ["background", "a", "b"])
    torch.manual_seed(0)  # the same teacher in every process
    config = preset("tiny", num_classes=3)
    card = ModelCard({"kind": "dynunet", "config": config.to_dict()}, cases.class_names, [1.0, 1.0, 1.0],
                     {"scheme": "none"}, [16, 16, 16], tap_names=encoder_tap_names(config))
    teacher = SimpleNamespace(network=build_unet(config), card=card, sha256="0" * 64)
    events = []
    run = TrainConfig(patch_size=(16, 16, 16), batch_size=2, steps=3, num_val_cases=0, checkpoint_every=2,
                      kd={"logit": {"weight": 1.0}, "fitnet": {"weight": 1.0}}, kd_weight=1.0, kd_warmup_steps=0,
                      student_reduction=2, optimizer="adamw", lr=1e-3, device="cpu", deterministic=True, seed=5)
    result = distill(run, teacher, cases, out, Reporter(events.append))
    torch.save(result.network.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"events{rank}.json"), "w") as fh:
        json.dump(events, fh)
    """
)


def test_two_process_gloo_distillation_ends_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a = safe_torch_load(out / "rank0.pt")
    b = safe_torch_load(out / "rank1.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between the two processes"

    state = safe_torch_load(out / "checkpoint.pt")
    assert state["step"] == 3 and len(state["samplers"]) == 2
    assert state["samplers"][0] != state["samplers"][1]  # each rank drew its own patches
    changed = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], state["network"][k])]
    assert not changed  # rank 0's checkpoint holds the same final weights

    events0 = json.loads((out / "events0.json").read_text())
    events1 = json.loads((out / "events1.json").read_text())
    assert events1 == []  # only rank 0 reports
    start = next(e for e in events0 if e["event"] == "start" and e["stage"] == "distill")
    assert events0[-1]["event"] == "done" and "2 process(es)" in start["message"]
    torch.manual_seed(5)  # distill seeds with config.seed, then builds the student: its initial weights
    initial = build_unet(preset("tiny", num_classes=3, filters=(8, 8, 16))).state_dict()
    assert any(not torch.equal(initial[k], a[k]) for k in a if a[k].is_floating_point())  # it trained
