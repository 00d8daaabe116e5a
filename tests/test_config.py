"""`deep_ep.Config`, the default config tables, the size hints and the event helpers (no ranks needed).

The numbers come from DeepEP V1's documented formulas; they are recomputed here independently, and
a few are pinned as literals too so that a formula error on both sides cannot hide.
"""

import inspect
import math

import pytest
import torch

import deep_ep
from deep_ep import Buffer, Config

CONFIG_KEYWORDS = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                   "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")

# ranks -> (nvl_send, nvl_recv, rdma_send, rdma_recv), DeepEP V1's tuned tables (num_sms comes from Buffer.num_sms).
DISPATCH_TABLE = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
COMBINE_TABLE = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


@pytest.fixture
def restore_num_sms():
    saved = Buffer.num_sms
    yield
    Buffer.num_sms = saved


def _fields(config):
    return tuple(getattr(config, name) for name in CONFIG_KEYWORDS)


def _round_up(value, multiple):
    return math.ceil(value / multiple) * multiple


# ----------------------------------------------------------------------------------------- Config

def test_config_defaults_and_keywords():
    defaults = {name: param.default for name, param in inspect.signature(Config).parameters.items()}
    assert defaults == dict(zip(CONFIG_KEYWORDS, (20, 6, 256, 6, 256)))
    # The RDMA ring is rounded up to whole send chunks: 256 -> 258 (a multiple of 6).
    assert _fields(Config()) == (20, 6, 256, 6, 258)
    config = Config(num_sms=24, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=512,
                    num_max_rdma_chunked_send_tokens=16, num_max_rdma_chunked_recv_tokens=128)
    assert _fields(config) == (24, 8, 512, 16, 128)
    assert _fields(Config(24, 8, 256)) == (24, 8, 256, 6, 258)  # positional, DeepEP's test style


def test_config_rounds_rdma_recv_up_to_send_multiple():
    assert Config(20, 6, 256, 20, 128).num_max_rdma_chunked_recv_tokens == 140
    assert Config(20, 6, 256, 12, 128).num_max_rdma_chunked_recv_tokens == 132
    assert Config(20, 6, 256, 8, 128).num_max_rdma_chunked_recv_tokens == 128
    assert Config(20, 6, 256, 7, 9).num_max_rdma_chunked_recv_tokens == 14


@pytest.mark.parametrize("num_sms", [1, 3, 21])
def test_config_odd_num_sms(num_sms):
    with pytest.raises(ValueError, match="num_sms"):
        Config(num_sms=num_sms)


@pytest.mark.parametrize("send, recv", [(256, 256), (300, 256)])
def test_config_nvl_send_not_below_recv(send, recv):
    with pytest.raises(ValueError, match="num_max_nvl_chunked_send_tokens") as info:
        Config(20, send, recv)
    assert "num_max_nvl_chunked_recv_tokens" in str(info.value)


@pytest.mark.parametrize("send, recv", [(128, 128), (130, 128)])
def test_config_rdma_send_not_below_recv(send, recv):
    with pytest.raises(ValueError, match="num_max_rdma_chunked_send_tokens"):
        Config(20, 6, 256, send, recv)


@pytest.mark.parametrize("index", range(5))
def test_config_rejects_non_positive(index):
    values = [20, 6, 256, 6, 256]
    values[index] = 0
    with pytest.raises(ValueError, match=CONFIG_KEYWORDS[index]):
        Config(*values)


def test_config_rejects_non_int():
    with pytest.raises(TypeError, match="num_sms"):
        Config(num_sms=20.0)


# ----------------------------------------------------------------------------------- size hints

def _nvl_hint(config, hidden_bytes, num_ranks):
    """DeepEP V1: channels * nvl * (2 * rdma + 3) ints of metadata + the ring buffers, 128-aligned."""
    channels = config.num_sms // 2
    nvl, rdma = min(num_ranks, 8), max(num_ranks // 8, 1)
    per_token = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4  # SourceMeta, max top-k idx/weights, max scales
    total = channels * nvl * (2 * rdma + 3) * 4 + channels * nvl * config.num_max_nvl_chunked_recv_tokens * per_token
    return _round_up(total, 128)


def _rdma_hint(config, hidden_bytes, num_ranks):
    if num_ranks <= 8:
        return 0
    channels, rdma = config.num_sms // 2, num_ranks // 8
    per_token = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4 + 16
    total = channels * rdma * (8 * 2 + 2) * 2 * 4 \
        + channels * rdma * config.num_max_rdma_chunked_recv_tokens * per_token * 2
    return _round_up(total, 128)


HIDDEN_BYTES = 7168 * 2


def test_nvl_hint_ep8_example():
    config = Config(24, 6, 256)
    assert config.get_nvl_buffer_size_hint(HIDDEN_BYTES, 8) == 402_851_712  # the spec's "≈ 402.9 MB"
    assert config.get_rdma_buffer_size_hint(HIDDEN_BYTES, 8) == 0


def test_hints_ep16_example():
    config = Config(24, 36, 288, 20, 128)
    assert config.get_nvl_buffer_size_hint(HIDDEN_BYTES, 16) == 453_208_704  # "≈ 453.2 MB"
    # The RDMA ring rounds 128 up to 140 (a multiple of 20) before the hint is computed. The spec's
    # "≈ 100.8 MB" is the formula with 128 tokens: 100,814,208 bytes.
    assert config.num_max_rdma_chunked_recv_tokens == 140
    assert config.get_rdma_buffer_size_hint(HIDDEN_BYTES, 16) == _rdma_hint(config, HIDDEN_BYTES, 16)
    assert config.get_rdma_buffer_size_hint(HIDDEN_BYTES, 16) == 110_265_216


def test_hints_ep64_example():
    config = Config(24, *DISPATCH_TABLE[64])
    assert config.get_nvl_buffer_size_hint(HIDDEN_BYTES, 64) == 453_213_312  # "≈ 453.2 MB"
    assert config.get_rdma_buffer_size_hint(HIDDEN_BYTES, 64) == 403_256_832  # "≈ 403.3 MB"


@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16, 24, 32, 64, 96, 128, 144, 160])
@pytest.mark.parametrize("hidden_bytes", [256, 4096 * 2, 7168 * 2, 7168 + 7168 // 128 * 4])
def test_hints_match_formula(num_ranks, hidden_bytes):
    for table in (DISPATCH_TABLE, COMBINE_TABLE):
        config = Config(24, *table[num_ranks])
        nvl = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
        rdma = config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks)
        assert nvl == _nvl_hint(config, hidden_bytes, num_ranks)
        assert rdma == _rdma_hint(config, hidden_bytes, num_ranks)
        assert nvl % 128 == 0 and rdma % 128 == 0


def _ll_hint(num_tokens, hidden, num_experts):
    num_scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    # DeepEP's region sizes, each rounded up to 128 bytes (deep_ep keeps every region 128-byte aligned;
    # DeepEP's value whenever its regions are already multiples of 128, as in the examples below)
    send = _round_up(max(num_tokens * dispatch_msg, num_experts * num_tokens * combine_msg), 128)
    recv = _round_up(max(num_experts * num_tokens * dispatch_msg, num_experts * num_tokens * combine_msg), 128)
    signaling = _round_up(num_experts * 4, 128)
    total = 2 * signaling + 2 * send + 2 * recv
    return (total + 128) // 128 * 128  # next multiple of 128 strictly above


def test_low_latency_rdma_size_hint_examples():
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 16, 256) == 1_908_410_496
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 16, 288) == 2_146_961_792
    # num_ranks does not enter the formula
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 1_908_410_496


@pytest.mark.parametrize("num_tokens, hidden, num_experts", [(1, 128, 2), (16, 2048, 32), (64, 4096, 64),
                                                             (256, 7168, 256), (128, 5120, 160)])
def test_low_latency_rdma_size_hint_formula(num_tokens, hidden, num_experts):
    assert Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, 8, num_experts) == \
        _ll_hint(num_tokens, hidden, num_experts)


# -------------------------------------------------------------------------------- config tables

@pytest.mark.parametrize("num_ranks", sorted(DISPATCH_TABLE))
def test_dispatch_and_combine_config_tables(num_ranks, restore_num_sms):
    for getter, table in ((Buffer.get_dispatch_config, DISPATCH_TABLE), (Buffer.get_combine_config, COMBINE_TABLE)):
        nvl_send, nvl_recv, rdma_send, rdma_recv = table[num_ranks]
        config = getter(num_ranks)
        assert isinstance(config, Config)
        assert _fields(config) == (Buffer.num_sms, nvl_send, nvl_recv, rdma_send, _round_up(rdma_recv, rdma_send))
    assert Buffer.num_sms == 20


def test_set_num_sms_changes_default_configs(restore_num_sms):
    Buffer.set_num_sms(24)
    assert Buffer.num_sms == 24
    assert Buffer.get_dispatch_config(8).num_sms == 24
    assert Buffer.get_combine_config(2).num_sms == 24


@pytest.mark.parametrize("value", [3, 21, 1])
def test_set_num_sms_odd(value, restore_num_sms):
    with pytest.raises(ValueError, match="new_num_sms"):
        Buffer.set_num_sms(value)
    assert Buffer.num_sms == 20


# ------------------------------------------------------------------------------ module surface

def test_topk_idx_t_is_int64():
    assert deep_ep.topk_idx_t is torch.int64


def test_public_names():
    from deep_ep.utils import EventHandle, EventOverlap  # noqa: F401  (Megatron-Core imports these)
    assert deep_ep.EventOverlap is EventOverlap
    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t"):
        assert hasattr(deep_ep, name), name


def test_event_overlap_on_cpu():
    from deep_ep.utils import EventHandle, EventOverlap
    event = Buffer.capture()
    assert isinstance(event, EventOverlap)
    event.current_stream_wait()
    with event:
        pass
    with EventOverlap(EventHandle(), extra_tensors=(torch.ones(2),)) as inner:
        assert inner.extra_tensors[0].sum().item() == 2.0
    with EventOverlap():  # an empty wrapper is a no-op in `with`
        pass


def test_low_latency_rdma_size_hint_rejects_a_hidden_the_mode_rejects():
    """low_latency_dispatch needs hidden % 128 == 0; the size hint says so instead of sizing a buffer no
    call can use."""
    with pytest.raises(ValueError, match="`hidden` must be a multiple of 128.*got 100"):
        Buffer.get_low_latency_rdma_size_hint(128, 100, 8, 16)
    assert Buffer.get_low_latency_rdma_size_hint(128, 256, 8, 16) > 0
