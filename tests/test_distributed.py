"""gradwatch under torch.distributed: 2 gloo ranks on CPU, against a single-process
reference that trains on the same global batches.

Tolerance: norms, maxima and concentrations agree with the reference to a relative
1e-5 (fp32 sums taken in a different order); decisions agree exactly. The ranks agree
with each other exactly: they decide from the same reduced numbers.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pytest
import torch

import dist_workers as w

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RTOL = 1e-5


def reference(**kwargs):
    return w.train(w.make_model(), 0, 1,
                   params_full=lambda m: [p.detach().clone() for p in m.parameters()], **kwargs)


def assert_matches_reference(run, ref):
    steps, ref_steps = run["steps"], ref["steps"]
    assert list(steps.action) == list(ref_steps.action)
    np.testing.assert_allclose(steps.global_norm, ref_steps.global_norm, rtol=RTOL)
    np.testing.assert_allclose(steps.clipped_norm, ref_steps.clipped_norm, rtol=RTOL)
    np.testing.assert_allclose(steps.threshold, ref_steps.threshold, rtol=RTOL)
    layers, ref_layers = run["layers"], ref["layers"]
    assert list(layers.layer) == list(ref_layers.layer)  # the model's own layer names
    for column in ("grad_norm", "clipped_norm", "max_abs", "concentration", "value_threshold",
                   "update_ratio"):
        np.testing.assert_allclose(layers[column], ref_layers[column], rtol=RTOL,
                                   err_msg=column)
    cols = ["step", "kind", "layer", "action"]
    pd.testing.assert_frame_equal(run["events"][cols], ref["events"][cols])
    assert run["layer_numel"] == ref["layer_numel"]
    for p, q in zip(run["params"], ref["params"]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def assert_ranks_agree(r0, r1):
    pd.testing.assert_frame_equal(r0["steps"], r1["steps"])
    pd.testing.assert_frame_equal(r0["layers"], r1["layers"])
    pd.testing.assert_frame_equal(r0["events"], r1["events"])


def test_the_reference_run_exercises_every_decision():
    ref = reference()
    # The update ratio is measured (and compared with every distributed run's).
    assert ref["layers"].update_ratio.notna().sum() > 0
    actions = ref["steps"].set_index("step").action
    assert [actions[s] for s in (*w.SPIKES, w.OUTLIER_STEP, w.NAN_STEP)] == [
        "clip_norm", "clip_norm", "clip_value", "skip"]
    assert (actions.drop([*w.SPIKES, w.OUTLIER_STEP, w.NAN_STEP]) == "none").all()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return w.spawn(2, "ddp", tmp_path_factory.mktemp("ddp"))


def test_ddp_matches_a_single_process_and_needs_no_communication(ddp_runs):
    r0, r1 = ddp_runs
    ref = reference(nan_via="input")
    for r in (r0, r1):
        assert_matches_reference(r["main"], ref)
        assert r["main"]["collectives"] == [0] * w.STEPS  # gradients are already averaged
        # A NaN in rank 1's loss reaches both ranks through DDP's average: both skip.
        assert r["main"]["moved"][w.NAN_STEP] == 0.0
        assert r["main"]["moved"][w.NAN_STEP + 1] > 0.0
    assert_ranks_agree(r0["main"], r1["main"])
    assert "ran inside DistributedDataParallel.no_sync()" in r0["no_sync_error"]


def test_ddp_state_saved_on_rank_0_resumes_every_rank_with_the_same_decisions(ddp_runs):
    r0, r1 = ddp_runs
    for r in (r0, r1):
        cont = r["main"]["steps"].set_index("step").loc[20:]
        resumed = r["resumed"]["steps"].set_index("step")
        assert list(resumed.index) == list(range(20, w.STEPS))
        assert list(resumed.action) == list(cont.action)
        np.testing.assert_allclose(resumed.threshold, cont.threshold, rtol=1e-6)
        np.testing.assert_allclose(resumed.global_norm, cont.global_norm, rtol=1e-6)
        ev = r["main"]["events"]
        pd.testing.assert_frame_equal(r["resumed"]["events"][["step", "kind", "action"]],
                                      ev[["step", "kind", "action"]])


def test_fsdp2_shards_reduce_to_the_single_process_numbers(tmp_path):
    r0, r1 = w.spawn(2, "fsdp2", tmp_path)
    # Rank 1 holds empty shards of the one-row last layer (weight and bias).
    assert r0["empty_shards"] == [False] * 6
    assert r1["empty_shards"] == [False] * 4 + [True, True]
    ref = reference()
    for r in (r0, r1):
        assert_matches_reference(r, ref)
        # The NaN sits in rank 1's shard only, yet both ranks skip the step.
        assert r["steps"].set_index("step").action[w.NAN_STEP] == "skip"
        assert r["moved"][w.NAN_STEP] == 0.0
        # Per step: one SUM and one MAX all-reduce of 2L values, and one SUM of the L
        # post-value-clip sums where a layer is value-clipped or a value non-finite (on
        # the CPU the decision is read; on accelerators it runs at every step). Never
        # one per tensor.
        assert r["collectives"] == [3 if s in (w.OUTLIER_STEP, w.NAN_STEP) else 2
                                    for s in range(w.STEPS)]
        assert r["device_path"]["collectives"] == [3] * w.STEPS
        assert list(r["device_path"]["steps"].action) == list(ref["steps"].action)
        assert r["norm_mode"] == [2] * 12
        assert "clip='agc' is not supported with sharded gradients" in r["agc_error"]
    assert_ranks_agree(r0, r1)


def test_fsdp2_with_a_fused_optimizer_skips_and_clips_like_a_single_process(tmp_path):
    # The skip flag and the clipping coefficient reach a fused AdamW through its
    # found_inf / grad_scale, on DTensor parameters.
    r0, r1 = w.spawn(2, "fsdp2_fused", tmp_path)
    ref = reference(fused=True)
    for r in (r0, r1):
        assert_matches_reference(r, ref)
        assert r["moved"][w.NAN_STEP] == 0.0
    assert_ranks_agree(r0, r1)


def test_hsdp_reduces_over_the_shard_dimension_only(tmp_path):
    r0, r1 = w.spawn(2, "hsdp", tmp_path)
    ref = reference(nan_rank=None, outlier=False)
    for r in (r0, r1):
        for shape, collectives in (((1, 2), 2), ((2, 1), 0)):
            assert_matches_reference(r[shape], ref)
            assert r[shape]["collectives"] == [collectives] * w.STEPS, shape
    for shape in ((1, 2), (2, 1)):
        assert_ranks_agree(r0[shape], r1[shape])


def test_fsdp1_flat_shards_reduce_to_the_single_process_numbers(tmp_path):
    r0, r1 = w.spawn(2, "fsdp1", tmp_path)
    ref = reference(nan_rank=None, outlier=False)
    for r in (r0, r1):
        assert_matches_reference(r, ref)
        assert r["collectives"] == [2] * w.STEPS
        # NO_SHARD holds whole gradients: nothing is reduced, nothing counted twice.
        assert_matches_reference(r["no_shard"], ref)
        assert r["no_shard"]["collectives"] == [0] * w.STEPS
        assert r["tiny_numel"] == 1 and r["tiny_norm"] == pytest.approx(2.0)
    assert_ranks_agree(r0, r1)


def test_a_replicated_gradient_beside_shards_counts_once(tmp_path):
    for r in w.spawn(2, "replicated", tmp_path):
        weight, bias, total = r["true"]
        assert r["weight"] == pytest.approx(weight, rel=RTOL)
        assert r["bias"] == pytest.approx(bias, rel=RTOL)
        assert r["global"] == pytest.approx(total, rel=RTOL)
        assert r["numel"] == [12, 4]


def test_only_rank_0_records_and_reports(tmp_path):
    r0, r1 = w.spawn(2, "reporting", tmp_path)
    assert r0["steps"] == r1["steps"] == 10
    assert r1["run_dir"] is None
    runs = os.listdir(tmp_path / "gradwatch_runs")
    assert len(runs) == 1 and r0["run_dir"] == str(tmp_path / "gradwatch_runs" / runs[0])
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) == 1


def test_a_rank_that_dies_is_reported_with_every_ranks_status_and_log(tmp_path):
    # Rank 1 aborts (as a C++ abort would end it) while rank 0 waits in a barrier: the
    # error names the signal and quotes rank 1's own log (faulthandler's traceback of
    # the abort) and rank 0's, instead of only "process 1 terminated with SIGABRT".
    with pytest.raises(w.WorkerFailed) as info:
        w.spawn(2, "abort_on_rank_1", tmp_path)
    report = str(info.value)
    assert "rank 1: killed by SIGABRT" in report
    assert "Fatal Python error: Aborted" in report and "in abort_on_rank_1" in report
    assert "--- rank 0: " in report and "barrier" in report
