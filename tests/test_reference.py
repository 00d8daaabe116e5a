"""Tests of the test oracle itself (``tests/reference.py``) on tiny examples computed by hand.

The expected values below were worked out on paper from ``docs/semantics.md``; the derivations are in
the comments so a reader can check them without running anything.
"""

import pytest
import torch

import reference as ref
from reference import Topology


def _i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def _assert_equal(got, expected, what):
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.equal(got, expected), f"{what}:\n got {got}\n expected {expected}"


def test_channel_ranges():
    assert ref.channel_ranges(3, 2) == [(0, 2), (2, 3)]
    assert ref.channel_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert ref.channel_ranges(0, 3) == [(0, 0)] * 3
    assert ref.channel_ranges(10, 10) == [(i, i + 1) for i in range(10)]
    assert ref.token_channels(5, 2) == [0, 0, 0, 1, 1]


# --------------------------------------------------------------------------------------------------
# One node: R = 2, E = 4 (2 local experts per rank), C = 2 channels, K = 2.
#   rank 0 (T=3): t0 -> experts {0, 3} -> ranks {0, 1};  t1 -> {1} -> rank 0;  t2 -> {2, 2} -> rank 1
#   rank 1 (T=2): t0 -> nothing;                          t1 -> {3, 0} -> ranks {0, 1}
#   channels: rank 0 per=2 -> ch0 = {t0, t1}, ch1 = {t2};  rank 1 per=1 -> ch0 = {t0}, ch1 = {t1}
# --------------------------------------------------------------------------------------------------

ONE_NODE = Topology(2)
ONE_NODE_TOPK = [torch.tensor([[0, 3], [1, -1], [2, 2]]), torch.tensor([[-1, -1], [3, 0]])]
ONE_NODE_WEIGHTS = [torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])]


def _one_node_dispatch(alignment=1, worst=0):
    lay = ref.layout_all(ONE_NODE_TOPK, 4, ONE_NODE)
    x = [torch.arange(6, dtype=torch.float32).reshape(3, 2).to(torch.bfloat16),
         (100 + torch.arange(4, dtype=torch.float32)).reshape(2, 2).to(torch.bfloat16)]
    out = ref.dispatch(x, [l["is_token_in_rank"] for l in lay], [l["num_tokens_per_expert"] for l in lay],
                       num_experts=4, num_channels=2, topo=ONE_NODE, topk_idx=ONE_NODE_TOPK,
                       topk_weights=ONE_NODE_WEIGHTS, expert_alignment=alignment, num_worst_tokens=worst)
    return lay, x, out


def test_layout_one_node():
    lay = ref.layout_all(ONE_NODE_TOPK, 4, ONE_NODE)
    _assert_equal(lay[0]["num_tokens_per_rank"], _i32([2, 2]), "rank0 per rank")
    _assert_equal(lay[0]["num_tokens_per_expert"], _i32([1, 1, 2, 1]), "rank0 per expert (duplicate counts twice)")
    _assert_equal(lay[0]["is_token_in_rank"], torch.tensor([[True, True], [True, False], [False, True]]), "rank0 in")
    assert lay[0]["num_tokens_per_rdma_rank"] is None
    _assert_equal(lay[1]["num_tokens_per_rank"], _i32([1, 1]), "rank1 per rank")
    _assert_equal(lay[1]["num_tokens_per_expert"], _i32([1, 0, 0, 1]), "rank1 per expert")
    _assert_equal(lay[1]["is_token_in_rank"], torch.tensor([[False, False], [True, True]]), "rank1 in")


def test_layout_zero_tokens():
    lay = ref.layout(torch.empty(0, 3, dtype=torch.int64), 8, Topology(4, 2))
    _assert_equal(lay["num_tokens_per_rank"], _i32([0, 0, 0, 0]), "per rank")
    _assert_equal(lay["num_tokens_per_rdma_rank"], _i32([0, 0]), "per node")
    _assert_equal(lay["is_token_in_rank"], torch.zeros(0, 4, dtype=torch.bool), "in rank")


def test_dispatch_one_node_data():
    _, x, out = _one_node_dispatch()
    # rank 0 receives (0, t0), (0, t1), (1, t1); rank 1 receives (0, t0), (0, t2), (1, t1).
    _assert_equal(out[0]["recv_x"], torch.stack([x[0][0], x[0][1], x[1][1]]), "rank0 recv_x")
    _assert_equal(out[1]["recv_x"], torch.stack([x[0][0], x[0][2], x[1][1]]), "rank1 recv_x")
    _assert_equal(out[0]["recv_topk_idx"], torch.tensor([[0, -1], [1, -1], [-1, 0]]), "rank0 topk_idx")
    _assert_equal(out[1]["recv_topk_idx"], torch.tensor([[-1, 1], [0, 0], [1, -1]]), "rank1 topk_idx")
    _assert_equal(out[0]["recv_topk_weights"], torch.tensor([[0.5, 0.0], [1.0, 0.0], [0.0, 8.0]]), "rank0 w")
    _assert_equal(out[1]["recv_topk_weights"], torch.tensor([[0.0, 0.25], [3.0, 4.0], [7.0, 0.0]]), "rank1 w")
    # expert 0: 1 + 1, expert 1: 1 + 0, expert 2: 2 + 0, expert 3: 1 + 1
    assert out[0]["num_recv_tokens_per_expert_list"] == [2, 1]
    assert out[1]["num_recv_tokens_per_expert_list"] == [2, 2]
    _, _, aligned = _one_node_dispatch(alignment=4)
    assert aligned[0]["num_recv_tokens_per_expert_list"] == [4, 4]
    assert aligned[1]["num_recv_tokens_per_expert_list"] == [4, 4]


def test_dispatch_one_node_handle():
    lay, _, out = _one_node_dispatch()
    h0, h1 = out[0]["handle"], out[1]["handle"]
    assert len(h0) == 6
    # sent counts: 0->0: 2, 0->1: 2, 1->0: 1, 1->1: 1; inclusive prefix over source rows, every column.
    for h in (h0, h1):
        _assert_equal(h[0], _i32([[2, 2], [3, 3]]), "rank_prefix_matrix")
    # rank 0 sends to 0: t0, t1 (both ch0) -> [2, 2]; to 1: t0 (ch0), t2 (ch1) -> [1, 2]
    _assert_equal(h0[1], _i32([[2, 2], [1, 2]]), "rank0 channel_prefix_matrix")
    # rank 1 sends t1 (ch1) to both -> [0, 1] each
    _assert_equal(h1[1], _i32([[0, 1], [0, 1]]), "rank1 channel_prefix_matrix")
    # receiver: exclusive prefix of the source's row towards me
    _assert_equal(h0[2], _i32([[0, 2], [0, 0]]), "rank0 recv_channel_prefix_matrix")
    _assert_equal(h1[2], _i32([[0, 1], [0, 0]]), "rank1 recv_channel_prefix_matrix")
    _assert_equal(h0[3], _i32([0, 1, 1]), "rank0 recv_src_idx")
    _assert_equal(h1[3], _i32([0, 2, 1]), "rank1 recv_src_idx")
    _assert_equal(h0[4], lay[0]["is_token_in_rank"], "rank0 is_token_in_rank")
    # rank 0: t0 (ch0) slot 0 to both; t1 (ch0) slot 1 to rank 0; t2 (ch1) slot 0 to rank 1
    _assert_equal(h0[5], _i32([[0, 0], [1, -1], [-1, 0]]), "rank0 send_head")
    _assert_equal(h1[5], _i32([[-1, -1], [0, 0]]), "rank1 send_head")


def test_dispatch_worst_tokens():
    _, x, out = _one_node_dispatch(worst=5)
    _, _, plain = _one_node_dispatch()
    for r in range(2):
        assert out[r]["num_recv_tokens_per_expert_list"] == []
        _assert_equal(out[r]["recv_x"][:3], plain[r]["recv_x"], "prefix")
        _assert_equal(out[r]["recv_x"][3:], torch.zeros(2, 2, dtype=torch.bfloat16), "zero tail")
        _assert_equal(out[r]["recv_topk_idx"][3:], torch.full((2, 2), -1), "topk_idx tail")
        _assert_equal(out[r]["recv_topk_weights"][3:], torch.zeros(2, 2), "weights tail")
        _assert_equal(out[r]["handle"][3], torch.cat([plain[r]["handle"][3], _i32([-1, -1])]), "src_idx tail")
    with pytest.raises(ref.WorstTokensOverflow):
        _one_node_dispatch(worst=2)


def test_dispatch_fp8_pair():
    lay = ref.layout_all(ONE_NODE_TOPK, 4, ONE_NODE)
    x = [(torch.randn(3, 128).to(torch.float8_e4m3fn), torch.randn(1, 3).T),
         (torch.randn(2, 128).to(torch.float8_e4m3fn), torch.randn(1, 2).T)]
    out = ref.dispatch(x, [l["is_token_in_rank"] for l in lay], [l["num_tokens_per_expert"] for l in lay],
                       num_experts=4, num_channels=2, topo=ONE_NODE, num_worst_tokens=4)
    data, scales = out[1]["recv_x"]
    assert data.dtype == torch.float8_e4m3fn and scales.is_contiguous() and scales.shape == (4, 1)
    _assert_equal(data[:3].view(torch.uint8), torch.stack([x[0][0][0], x[0][0][2], x[1][0][1]]).view(torch.uint8), "fp8")
    _assert_equal(data[3:].view(torch.uint8), torch.zeros(1, 128, dtype=torch.uint8), "fp8 tail")
    _assert_equal(scales, torch.stack([x[0][1][0], x[0][1][2], x[1][1][1], torch.zeros(1)]), "scales")
    assert out[0]["recv_topk_idx"] is None and out[0]["recv_topk_weights"] is None


def test_combine_one_node():
    lay, _, _ = _one_node_dispatch()
    in_rank = [l["is_token_in_rank"] for l in lay]
    bf = lambda rows: torch.tensor(rows, dtype=torch.bfloat16)  # noqa: E731
    y = [bf([[1, 10], [2, 20], [3, 30]]), bf([[100, 1000], [200, 2000], [300, 3008]])]
    w = [torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]), torch.tensor([[0.0, 4.0], [5.0, 6.0], [7.0, 0.0]])]
    out = ref.combine(y, in_rank, ONE_NODE, topk_weights=w)
    # rank 0: t0 = y0[0] + y1[0] = [101, 1010] -> bf16 [101, 1008] (1010 is a tie between 1008 and 1012);
    #         t1 = y0[1]; t2 = y1[1].
    _assert_equal(out[0][0], bf([[101, 1008], [2, 20], [200, 2000]]), "rank0 combined_x")
    _assert_equal(out[0][1], torch.tensor([[1.0, 4.0], [2.0, 0.0], [5.0, 6.0]]), "rank0 weights")
    # rank 1: t0 goes nowhere -> 0; t1 = y0[2] + y1[2] = [303, 3038] -> bf16 [304, 3040] (303: tie -> even)
    _assert_equal(out[1][0], bf([[0, 0], [304, 3040]]), "rank1 combined_x")
    _assert_equal(out[1][1], torch.tensor([[0.0, 0.0], [7.0, 3.0]]), "rank1 weights")
    # bias pair on rank 1: t0 = b0 + b1 = 3; t1 = bf16(1 - 7 + 3 + 300, 1 + 0 + 30 + 3008) = bf16(297, 3039)
    bias = [None, (bf([[1, 1], [1, 1]]), bf([[2, 2], [-7, 0]]))]
    out = ref.combine(y, in_rank, ONE_NODE, bias=bias)
    _assert_equal(out[1][0], bf([[3, 3], [296, 3040]]), "rank1 combined_x with bias")
    assert out[1][1] is None


def test_combine_fp32_order_one_node():
    # One token sent to ranks 0, 1, 2. Ascending fp32 accumulation: bias 1 + 2^24 -> 2^24 (tie to even),
    # + 1 -> 2^24, - 2^24 -> 0. Any other order gives 1 or 2.
    topo = Topology(3)
    in_rank = [torch.tensor([[True, True, True]]), torch.zeros(0, 3, dtype=torch.bool),
               torch.zeros(0, 3, dtype=torch.bool)]
    y = [torch.tensor([[2.0 ** 24]], dtype=torch.bfloat16), torch.tensor([[1.0]], dtype=torch.bfloat16),
         torch.tensor([[-2.0 ** 24]], dtype=torch.bfloat16)]
    bias = [torch.tensor([[1.0]], dtype=torch.bfloat16), torch.zeros(0, 1, dtype=torch.bfloat16),
            torch.zeros(0, 1, dtype=torch.bfloat16)]
    out = ref.combine(y, in_rank, topo, bias=bias)
    assert out[0][0].item() == 0.0
    assert out[1][0].shape == (0, 1)


def test_combine_hierarchical():
    # R = 4 as 2 nodes x 2. Rank 0's only token goes to ranks 0, 1 (node 0) and 2 (node 1).
    # p_0 = bf16(256 + 1) = 256 (tie to even), p_1 = 1, result bf16(256 + 1) = 256; a flat sum gives 258.
    topo = Topology(4, 2)
    empty = torch.zeros(0, 4, dtype=torch.bool)
    in_rank = [torch.tensor([[True, True, True, False]]), empty, empty, empty]
    y = [torch.tensor([[256.0]], dtype=torch.bfloat16), torch.tensor([[1.0]], dtype=torch.bfloat16),
         torch.tensor([[1.0]], dtype=torch.bfloat16), torch.zeros(0, 1, dtype=torch.bfloat16)]
    w = [torch.tensor([[0.5]]), torch.tensor([[0.25]]), torch.tensor([[2.0]]), torch.zeros(0, 1)]
    out = ref.combine(y, in_rank, topo, topk_weights=w)
    assert out[0][0].item() == 256.0
    assert out[0][1].item() == 2.75
    flat = ref.combine(y, in_rank, Topology(4))
    assert flat[0][0].item() == 258.0


# --------------------------------------------------------------------------------------------------
# Two nodes: R = 4 as 2 x 2, E = 4 (one expert per rank), C = 2, T = 2 per rank (ch0 = t0, ch1 = t1).
#   rank 0: t0 -> ranks {0, 2} (nodes 0, 1), t1 -> {3} (node 1)
#   rank 1: t0 -> {1, 3} (nodes 0, 1),      t1 -> nothing
#   rank 2: t0 -> {2, 3} (node 1),          t1 -> {0} (node 0)
#   rank 3: t0 -> {1} (expert 1 twice),     t1 -> {2, 0} (nodes 1, 0)
# --------------------------------------------------------------------------------------------------

TWO_NODES = Topology(4, 2)
TWO_NODES_TOPK = [torch.tensor([[0, 2], [3, -1]]), torch.tensor([[1, 3], [-1, -1]]),
                  torch.tensor([[2, 3], [0, -1]]), torch.tensor([[1, 1], [2, 0]])]


def test_layout_two_nodes():
    lay = ref.layout_all(TWO_NODES_TOPK, 4, TWO_NODES)
    assert [l["num_tokens_per_rank"].tolist() for l in lay] == [[1, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1],
                                                                [1, 1, 1, 0]]
    assert [l["num_tokens_per_rdma_rank"].tolist() for l in lay] == [[1, 2], [1, 1], [1, 1], [2, 1]]
    assert [l["num_tokens_per_expert"].tolist() for l in lay] == [[1, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1],
                                                                  [1, 2, 1, 0]]


def test_dispatch_two_nodes_handle():
    lay = ref.layout_all(TWO_NODES_TOPK, 4, TWO_NODES)
    x = [torch.full((2, 8), 10.0 * s, dtype=torch.bfloat16) + torch.arange(2).reshape(2, 1) for s in range(4)]
    out = ref.dispatch(x, [l["is_token_in_rank"] for l in lay], [l["num_tokens_per_expert"] for l in lay],
                       num_experts=4, num_channels=2, topo=TWO_NODES, topk_idx=TWO_NODES_TOPK,
                       topk_weights=[torch.ones(2, 2)] * 4)
    assert [o["recv_sources"] for o in out] == [[(0, 0), (2, 1), (3, 1)], [(1, 0), (3, 0)],
                                                [(0, 0), (2, 0), (3, 1)], [(0, 1), (1, 0), (2, 0)]]
    # rank 2 = node 1, local 0
    h = out[2]["handle"]
    assert len(h) == 10
    _assert_equal(h[0], lay[2]["is_token_in_rank"], "is_token_in_rank")
    # sender: node 0 gets t1 (ch1), node 1 gets t0 (ch0)
    _assert_equal(h[1], _i32([[0, 1], [1, 1]]), "rdma_channel_prefix_matrix")
    _assert_equal(h[2], _i32([[0, 1], [0, 0], [1, 1], [1, 1]]), "gbl_channel_prefix_matrix")
    # forwarder for sources rank 0 (node 0) and rank 2 (node 1): their field-1 rows for node 1
    _assert_equal(h[3], _i32([[1, 2], [1, 1]]), "recv_rdma_channel_prefix_matrix")
    _assert_equal(h[4], _i32([2, 3]), "recv_rdma_rank_prefix_sum")
    # received 1, 0, 1, 1 from ranks 0..3: segment starts 0, 1, 1, 2
    _assert_equal(h[5], _i32([[0, 1], [1, 1], [1, 2], [2, 2]]), "recv_gbl_channel_prefix_matrix")
    _assert_equal(h[6], _i32([1, 1, 2, 3]), "recv_gbl_rank_prefix_sum")
    # (0,t0): node 0, reaches rank 2 only (bit 0); (2,t0): node 1, ranks 2 and 3; (3,t1): node 1, rank 2
    _assert_equal(h[7], _i32([[0, 1], [1, 3], [1, 1]]).view(torch.uint8), "recv_src_meta")
    _assert_equal(h[8], _i32([[-1, 0], [0, -1]]), "send_rdma_head")
    # forwarded rows: (0,t0) ch0 -> j0; (0,t1) ch1 -> j1; (2,t0) ch0 -> j0 (second in ch0), j1
    _assert_equal(h[9], _i32([[0, -1], [-1, 0], [1, 0]]), "send_nvl_head")
    # rank 0 = node 0, local 0: forwards rank 0's t0 (ch0) and rank 2's t1 (ch1), both to local rank 0
    h0 = out[0]["handle"]
    _assert_equal(h0[4], _i32([1, 2]), "rank0 recv_rdma_rank_prefix_sum")
    _assert_equal(h0[9], _i32([[0, -1], [0, -1]]), "rank0 send_nvl_head")
    _assert_equal(h0[3], _i32([[1, 1], [0, 1]]), "rank0 recv_rdma_channel_prefix_matrix")
    # rank 3 = node 1, local 1: forwards rank 1's t0 (-> rank 3) and rank 3's t1 (-> rank 2)
    h3 = out[3]["handle"]
    _assert_equal(h3[9], _i32([[-1, 0], [0, -1]]), "rank3 send_nvl_head")
    _assert_equal(h3[7], _i32([[0, 2], [0, 2], [1, 3]]).view(torch.uint8), "rank3 recv_src_meta")
    _assert_equal(out[1]["recv_x"], torch.stack([x[1][0], x[3][0]]), "rank1 recv_x")
    _assert_equal(out[3]["recv_topk_idx"], torch.tensor([[0, -1], [-1, 0], [-1, 0]]), "rank3 recv_topk_idx")


def test_combine_weights_are_a_flat_sum_on_several_nodes():
    # The weights are "the same plain sum" (fp32, no rounding): over ranks ascending, not per node.
    # Token to ranks 0 (node 0), 2 and 3 (node 1): flat (1 + 2^-24) + 2^-24 = 1 (ties to even twice);
    # per node it would be 1 + (2^-24 + 2^-24) = 1 + 2^-23.
    topo = Topology(4, 2)
    empty = torch.zeros(0, 4, dtype=torch.bool)
    in_rank = [torch.tensor([[True, False, True, True]]), empty, empty, empty]
    y = [torch.ones(1, 1, dtype=torch.bfloat16), torch.zeros(0, 1, dtype=torch.bfloat16),
         torch.ones(1, 1, dtype=torch.bfloat16), torch.ones(1, 1, dtype=torch.bfloat16)]
    w = [torch.tensor([[1.0]]), torch.zeros(0, 1), torch.tensor([[2.0 ** -24]]), torch.tensor([[2.0 ** -24]])]
    out = ref.combine(y, in_rank, topo, topk_weights=w)
    assert out[0][1].item() == 1.0
    assert out[0][0].item() == 3.0
