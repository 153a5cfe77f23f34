"""topk_shared and wire_dtype on 2 gloo ranks against the simulator, bit for bit (with a resume for
topk_shared), and the bytes on the wire per step from the formulas. The runs, setup and replay are
those of ``test_methods_distributed.py``.

References: docs/algorithms.md 3.12 (wire dtype) and 3.13 (topk_shared); the in-process checks are in
``tests/transport/test_scaleout.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_methods_distributed import STEPS, _replay, config, run_interrupted

CASES: dict[str, dict[str, Any]] = {
    "gmc_topk_shared": {"method": "gmc", "compressor": "topk_shared", "density": 0.05},
    # the all-gather route packs bf16 values and int32 indices into one byte buffer
    "gmc_topk_bf16": {"method": "gmc", "compressor": "topk", "density": 0.05, "wire_dtype": "bf16"},
    "gmc_plus_topk_shared_bf16": {
        "method": "gmc",
        "compressor": "topk_shared",
        "density": 0.05,
        "detach": 0.5,
        "wire_dtype": "bf16",
    },
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """topk_shared interrupted and resumed (the leader is step mod K after the resume too), top-k in
    one uninterrupted run (keeps the suite short): two launches for every case."""
    counted = {"count_collectives": True}
    interrupted = {case: config(s, counted) for case, s in CASES.items() if s["compressor"] == "topk_shared"}
    straight = {case: config(s, counted) for case, s in CASES.items() if s["compressor"] != "topk_shared"}
    return run_interrupted(tmp_path_factory.mktemp("scaleout"), interrupted, straight)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_the_simulator_bit_for_bit_and_resume(
    launched: dict[str, dict[str, Any]], case: str
) -> None:
    strategy = CASES[case]
    first, resumed = launched[case]["first"], launched[case]["resumed"]
    if strategy["compressor"] == "topk_shared":
        runs = ((first, STEPS // 2), (resumed, STEPS))
    else:
        runs = ((first, STEPS),)
    for result, _ in runs:  # this case's own runs, out of the launches of every case
        assert f" with {strategy['compressor']}, " in result[0]["gmc_state"]["method"]
    expected = _replay(strategy)
    for result, step in runs:
        for rank in range(2):
            for name, tensor in expected["params"][step - 1][rank].items():
                assert torch.equal(result[rank]["params"][name], tensor), (case, step, rank, name)
    rcc = [m["gmc/rcc"] for r, _ in runs for m in r[0]["metrics"] if "gmc/rcc" in m]
    assert rcc == pytest.approx(expected["rcc"], rel=1e-6)  # logged through Lightning in fp32
    # bytes on the wire per step (K = 2), from the formulas: topk_shared, k int32 broadcast + ring
    # all-reduce of k values; topk, an all-gather of k values and k int32 indices
    counts = [max(1, int(0.05 * p.numel() + 1e-9)) for p in _small_params()]
    k = sum(counts)
    value_bytes = 2 if strategy.get("wire_dtype") == "bf16" else 4
    sent = [m["gmc/bytes_sent"] for r, _ in runs for m in r[0]["metrics"] if "gmc/bytes_sent" in m]
    if strategy["compressor"] == "topk_shared":
        # 16-bit values are summed in rank order: element j of parameter p is owned by worker
        # (p + j) mod K, every worker's share padded to the longest (docs/algorithms.md 3.12)
        shares = [sum((p + j) % 2 == r for p, n in enumerate(counts) for j in range(n)) for r in range(2)]
        summed = 2 * max(shares) if value_bytes == 2 else k
        assert sent == [0.5 * 4 * k + 2 * 0.5 * value_bytes * summed] * STEPS
        # what the exchange really handed to the collectives per step (one bucket; the support's
        # broadcast goes through its own back-end): one all-reduce, or in 16 bits a reduce-scatter of
        # the padded values and an all-gather of half of them
        values = (
            [("all_reduce", 4 * k)]
            if value_bytes == 4
            else [("reduce_scatter", 2 * summed), ("all_gather", summed)]
        )
        for result, step in runs:
            steps_run = step - (STEPS // 2 if step == STEPS else 0)
            assert result[0]["collective_calls"] == values * steps_run
    else:
        assert sent == [(value_bytes + 4) * k] * STEPS


def _small_params() -> list[torch.Tensor]:
    from helpers import make_model

    return list(make_model("small", 0).parameters())
