"""Nothing listens beyond loopback: deep_ep itself, the test launcher, and the launch scripts.

On one host deep_ep's own rendezvous store and gloo group bind 127.0.0.1. The listening sockets of a
rank process are read from ``/proc/net/tcp{,6}`` (the rows whose inode is one of the process's own
file descriptors), so the check needs neither ``ss`` nor root.

torch's ``init_process_group(init_method="tcp://127.0.0.1:PORT")`` makes rank 0's store listen on
every interface (``[::]:PORT``) whatever the address says; launchers use
``deep_ep._comm.loopback_store`` instead, which the last test checks in the sources of the tests,
benchmarks and examples.
"""

import ipaddress
import os
import re
from typing import Dict, List, Tuple

import pytest

from dist_utils import run_ranks

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hex_to_ip(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6 prints four 32-bit words, each in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(words)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def listening_sockets(pid: str = "self") -> List[Tuple[str, int]]:
    """``(address, port)`` of every TCP socket the process listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                addr, port = f[1].split(":")
                out.append((_hex_to_ip(addr, v6), int(port, 16)))
    return sorted(out)


def _is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


def _sockets_rank(rank: int, num_ranks: int, group) -> Dict[str, List[Tuple[str, int]]]:
    import torch
    import deep_ep
    before = listening_sockets()
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(8, 128, num_ranks, 2 * num_ranks)
    nvl = max(c.get_nvl_buffer_size_hint(128 * 2, num_ranks)
              for c in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)))
    buffers = [deep_ep.Buffer(group, num_nvl_bytes=nvl),
               deep_ep.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, enable_shrink=True)]
    x = torch.randn(4, 128).to(torch.bfloat16)
    topk = torch.arange(4).remainder(2 * num_ranks).view(4, 1).contiguous()
    per_rank, _, per_expert, in_rank, _ = buffers[0].get_dispatch_layout(topk, 2 * num_ranks)
    buffers[0].dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    buffers[1].low_latency_dispatch(x, topk, 8, 2 * num_ranks, use_fp8=False)
    after = listening_sockets()
    return {"before": before, "after": after}


@pytest.fixture(scope="module")
def sockets():
    return run_ranks(_sockets_rank, 2, timeout_s=120)


def test_deep_ep_listens_on_loopback_only(sockets):
    for rank, res in enumerate(sockets):
        added = sorted(set(res["after"]) - set(res["before"]))
        assert added, f"rank {rank}: expected deep_ep's own listening sockets (gloo group, store on rank 0)"
        wide = [s for s in added if not _is_loopback(s[0])]
        assert not wide, f"rank {rank}: deep_ep listens beyond loopback: {wide}"


def test_test_launcher_listens_on_loopback_only(sockets):
    for rank, res in enumerate(sockets):
        wide = [s for s in res["before"] if not _is_loopback(s[0])]
        assert not wide, (f"rank {rank}: the test launcher (tests/dist_utils.py) listens beyond loopback: {wide}; "
                          f"use deep_ep.utils.loopback_store instead of init_method='tcp://...'")


def test_launch_scripts_use_explicit_loopback_rendezvous():
    """Tests, benchmarks and examples must not use torch's tcp:// or env:// init, which listen on every
    interface; a single-host launch goes through `loopback_store` (an explicit 127.0.0.1 address)."""
    offenders = []
    pattern = re.compile(r"init_method\s*=\s*f?[\"'](tcp|env)://")
    for folder in ("tests", "benchmarks", "examples"):
        root = os.path.join(_REPO, folder)
        if not os.path.isdir(root):
            continue
        for dirpath, _, files in os.walk(root):
            for name in files:
                if not name.endswith(".py") or name == os.path.basename(__file__):
                    continue
                path = os.path.join(dirpath, name)
                for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
                    if pattern.search(line):
                        offenders.append(f"{os.path.relpath(path, _REPO)}:{lineno}: {line.strip()}")
    assert not offenders, ("these launchers make rank 0's store listen on every interface; use "
                           "deep_ep.utils.loopback_store:\n  " + "\n  ".join(offenders))


def test_loopback_listener_holds_its_port_until_the_store_serves_on_it():
    """Launchers pass rank 0 an already-listening socket (`loopback_listener`): between choosing the port
    and rank 0's store serving on it, no other process can bind it (the port race that a bind-to-0-and-close
    leaves open failed a CI run: another scenario's process took a chosen port before its rank 0 bound it)."""
    import errno
    import socket
    from deep_ep._comm import loopback_listener, loopback_store
    listener = loopback_listener()
    port = listener.getsockname()[1]
    assert listener.getsockname()[0] == "127.0.0.1"
    intruder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with pytest.raises(OSError) as caught:
        intruder.bind(("127.0.0.1", port))
    intruder.close()
    assert caught.value.errno == errno.EADDRINUSE
    server = loopback_store(0, 0, 2, 30, listener)   # `port` is ignored when a listener is given
    client = loopback_store(port, 1, 2, 30)
    client.set("key", "value")
    assert server.get("key") == b"value"
    assert ("127.0.0.1", port) in listening_sockets()
