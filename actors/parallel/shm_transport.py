"""Shared-memory exchange for the ranks of one machine: the router's four calls (`exchange.CollectiveExchange`)
through one mapped file in /dev/shm, with a per-rank sequence counter as the doorbell.

An attention rank writes its block for expert rank j into slot (j, a), then bumps its counter and wakes its
waiters (futex); expert rank j waits for every attention rank's counter, computes straight from its slots,
writes its reply to slot (a, j) of the combine region and bumps its own counter. No slot is overwritten before
its reader is done: an attention rank dispatches again only after every reply of the last layer came in, and an
expert rank replies again only after the next dispatch, so one counter per rank is all the synchronization.
The counters are plain aligned int32 stores after the data's stores; x86's total store order keeps them in that
order (on other CPUs `make_exchange` keeps the collective). Next to its counter an attention rank announces each
dispatch's block rows and MoE layer, so an expert rank needs no call per step to know them: it serves in a
standing loop (`ExpertShardActor.serve`), and every dispatch rings the doorbell, also one that goes over the
collective.

Waits spin for `spin_s` (0 by default: with more processes than cores a spinning waiter takes the core its
peer needs) and then sleep in futex_wait, in slices of `POLL_S`; after each slice every rank's process is
checked, so a dead peer raises within POLL_S and a stuck one within `timeout_s` (an expert rank waiting for a
step's first MoE layer waits for as long as the engine is idle: `idle`). A rank that raises sets the
abort word and wakes every waiter, which then raises too: no survivor waits on a live rank that gave up. Dispatch
blocks larger than a slot go over the collective, and so does their reply; every rank sees the same sizes, so
all of them take the same path.

Ping-pong micro-batches (`Router.micro_batches`) take two lanes, each with its own counters and slots, so that
one half's exchange is in flight while the other half's attention computes; the abort word is shared.

Shapes: A attention ranks, R expert ranks, B rows per block, H hidden.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
import uuid

import torch

from llama4serve.actors.parallel.exchange import CollectiveExchange

POLL_S = 0.05  # futex slice between liveness checks of every rank
COUNTER_STRIDE = 64  # one cache line per rank and lane: its counter, then (attention ranks) what it announces
LANES = 2  # one per micro-batch in flight
SYS_FUTEX = {"x86_64": 202}.get(platform.machine())
FUTEX_WAIT, FUTEX_WAKE = 0, 1  # shared (not PRIVATE): the waiters are other processes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleeps while the int32 at `addr` equals `expected`, at most `timeout_s` (returns early on a wake)."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(SYS_FUTEX, ctypes.c_void_p(addr), FUTEX_WAIT, ctypes.c_int(expected), ctypes.byref(ts), None, 0)


def futex_wake(addr: int) -> None:
    _libc.syscall(SYS_FUTEX, ctypes.c_void_p(addr), FUTEX_WAKE, ctypes.c_int(2**31 - 1), None, None, 0)


def process_alive(pid: int) -> bool:
    """True while `pid` runs on this machine (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def machine_key() -> str:
    """Equal on two processes exactly when they share this machine's /dev/shm and pid namespace and, inside
    Ray, one Ray node (ranks on different Ray nodes keep the collective, also where the nodes share a machine)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        node = ""
    return f"{boot}/{platform.node()}/{os.readlink('/proc/self/ns/pid')}/{os.stat('/dev/shm').st_ino}/{node}"


class PeerFailed(RuntimeError):
    pass


class Stopped(Exception):
    """`stop` was called while this rank waited (the group is being re-formed)."""


class ShmExchange(CollectiveExchange):
    """The exchange through shared memory; see the module docstring. `pids[r]` is rank r's process."""

    name = "shm"
    standing = True

    def __init__(self, path: str, rank: int, first_expert_rank: int, world_size: int, pids: list[int],
                 slot_bytes: int, timeout_s: float, spin_s: float = 0.0, lane: int = 0):
        """Lane `lane` of the group's file; `make_exchange` makes every lane and links them (`lanes`)."""
        super().__init__(first_expert_rank, world_size)
        self.rank, self.pids, self.slot_bytes = rank, pids, slot_bytes
        self.timeout_s, self.spin_s = timeout_s, spin_s
        a, r = first_expert_rank, world_size - first_expert_rank
        self.header = _header_bytes(world_size) + lane * 2 * a * r * slot_bytes  # this lane's dispatch slots
        self.combine_offset = self.header + a * r * slot_bytes
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, _file_bytes(world_size, first_expert_rank, slot_bytes))
        finally:
            os.close(fd)
        raw = torch.frombuffer(self.map, dtype=torch.uint8)  # the whole file, as bytes
        views: dict[tuple, torch.Tensor] = {}  # slot views by (offset, count, every, rows, H, dtype)
        # Behind a function: the transport's buffer, not tensors the actor holds (`resident.tensor_bytes`).
        self.mapped = lambda: (raw, views)
        def line(lane_: int, i: int, at: int = 0) -> ctypes.c_int32:  # an int32 of rank i's line in lane_
            return ctypes.c_int32.from_buffer(self.map, (lane_ * world_size + i) * COUNTER_STRIDE + at)

        self.counters = [line(lane, i) for i in range(world_size)]
        self.aborted = line(LANES, 0)  # 1 + the aborting rank, for every lane
        # What attention rank a announces with each dispatch: (block rows, MoE layer, micro-batches of the layer)
        self.announced = [(line(lane, i, 4), line(lane, i, 8), line(lane, i, 12)) for i in range(a)]
        self.every_counter = [ctypes.addressof(line(k, i)) for k in range(LANES) for i in range(world_size)]
        self.awaited = False  # expert side: the next dispatch was awaited (`await_dispatch`), not yet received
        self.stopping = False
        self.addresses = [ctypes.addressof(c) for c in self.counters]
        self.via_shm = True  # the path of this MoE layer's exchange, chosen by its dispatch block's size
        self.seq = 0  # exchanges so far, the same on every rank
        self.shm_exchanges = 0  # those that went through shared memory
        self.waits = 0  # waits that found the peer not yet there (and slept or spun)

    def fits(self, rows: int, h: int, dtype: torch.dtype) -> bool:
        return rows * h * dtype.itemsize <= self.slot_bytes

    def _slots(self, offset: int, count: int, every: int, rows: int, h: int, dtype: torch.dtype) -> torch.Tensor:
        """[count, rows, H] view of the mapped file: the slots at byte `offset` + i * `every` slots (cached)."""
        key, (raw, views) = (offset, count, every, rows, h, dtype), self.mapped()
        if (view := views.get(key)) is None:
            size = dtype.itemsize
            slot = self.slot_bytes // size
            with torch.inference_mode(False):  # a plain view: written to inside inference mode and outside it
                view = raw.view(dtype).as_strided((count, rows, h), (every * slot, h, 1), offset // size)
            views[key] = view
        return view

    def _post(self) -> None:
        self.counters[self.rank].value = self.seq
        futex_wake(self.addresses[self.rank])

    def _await(self, peer: int, idle: bool = False) -> None:
        """Waits for `peer`'s counter to reach this exchange; `idle`: for as long as it takes (its process
        lives and nobody aborts), else at most timeout_s."""
        counter, want = self.counters[peer], self.seq
        if counter.value == want:
            return
        self.waits += 1
        start = time.monotonic()
        if self.spin_s:  # yield while spinning: a runnable peer gets this core at once
            while counter.value != want and time.monotonic() - start < self.spin_s:
                os.sched_yield()
        while (seen := counter.value) != want:
            if (by := self.aborted.value) > 0:
                raise PeerFailed(f"rank {by - 1} (pid {self.pids[by - 1]}) aborted the group's MoE exchange {want} "
                                 "(a peer died or hung); the engine's recovery re-forms the group")
            if self.stopping:
                raise Stopped()
            left = POLL_S if idle else start + self.timeout_s - time.monotonic()
            if left <= 0:
                self._abort(TimeoutError(f"rank {peer} (pid {self.pids[peer]}) did not reach MoE exchange {want} "
                                         f"within {self.timeout_s:.0f} s (collective_timeout_s); stuck or too slow"))
            futex_wait(self.addresses[peer], seen, min(POLL_S, left))
            if counter.value != want and (dead := [r for r, p in enumerate(self.pids) if not process_alive(p)]):
                self._abort(PeerFailed(f"rank {dead[0]} (pid {self.pids[dead[0]]}) died during MoE exchange "
                                       f"{want}; the engine's recovery replaces it and re-forms the group"))

    def abort(self) -> None:
        """Marks the group failed and wakes every waiter, in every lane: they raise, at once."""
        if not self.aborted.value:
            self.aborted.value = self.rank + 1
        for address in self.every_counter:
            futex_wake(address)

    def _abort(self, err: Exception) -> None:
        self.abort()
        raise err

    def stop(self) -> None:
        """From another thread: this rank's waits raise `Stopped` within POLL_S (the group is re-formed)."""
        for lane in self.lanes:
            lane.stopping = True
        for address in self.every_counter:
            futex_wake(address)

    def _next(self) -> None:
        self.seq = (self.seq + 1) & 0x7FFFFFFF

    def dispatch(self, blocks: torch.Tensor, layer: int = -1, micro_batches: int = 1) -> None:
        num_ranks, rows, h = blocks.shape
        self.via_shm = self.fits(rows, h, blocks.dtype)
        self._next()
        words = self.announced[self.rank]
        words[0].value, words[1].value, words[2].value = rows, layer, micro_batches
        if not self.via_shm:  # the doorbell announces it; the blocks go over the collective
            self._post()
            return super().dispatch(blocks)
        self.shm_exchanges += 1
        a = self.first_expert_rank  # slot (j, a): expert j's slots are consecutive
        self._slots(self.header + self.rank * self.slot_bytes, num_ranks, a, rows, h, blocks.dtype).copy_(blocks)
        self._post()

    def combine(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """[R, rows, H], a view of the shared slots, valid until this rank's next dispatch."""
        h, a = like.shape[-1], self.first_expert_rank
        if not self.via_shm:  # the reply takes the dispatch's path (its blocks are no larger)
            return super().combine(rows, like)
        for peer in range(a, self.world_size):
            self._await(peer)
        offset = self.combine_offset + self.rank * (self.world_size - a) * self.slot_bytes
        return self._slots(offset, self.world_size - a, 1, rows, h, like.dtype)

    def await_dispatch(self, idle: bool = False) -> tuple[int, int, int]:
        """Expert side: waits until every attention rank has dispatched the next MoE layer on this lane (`idle`:
        without a timeout, for a step's first); its (block rows, layer, micro-batches) as announced. `receive`
        then takes the blocks."""
        self._next()
        for peer in range(self.first_expert_rank):
            self._await(peer, idle)
        self.awaited = True
        return tuple(word.value for word in self.announced[0])

    def receive(self, rows: int, hidden_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[A, rows, H], a view of the shared slots, valid until this rank's reply."""
        if not self.awaited:
            self.await_dispatch()
        self.awaited = False
        self.via_shm = self.fits(rows, hidden_size, dtype)
        if not self.via_shm:
            return super().receive(rows, hidden_size, dtype, device)
        self.shm_exchanges += 1
        a, j = self.first_expert_rank, self.rank - self.first_expert_rank
        return self._slots(self.header + j * a * self.slot_bytes, a, 1, rows, hidden_size, dtype)

    def _reply_slots(self, rows: int, h: int, dtype: torch.dtype) -> torch.Tensor:
        r, j = self.world_size - self.first_expert_rank, self.rank - self.first_expert_rank
        offset = self.combine_offset + j * self.slot_bytes  # slot (a, j): attention a's slots are consecutive
        return self._slots(offset, self.first_expert_rank, r, rows, h, dtype)

    def reply_buffer(self, rows: int, hidden_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The reply slots themselves, when this layer goes through shared memory: `reply` copies nothing."""
        if not self.via_shm:
            return super().reply_buffer(rows, hidden_size, dtype, device)
        return self._reply_slots(rows, hidden_size, dtype)

    def reply(self, blocks: torch.Tensor) -> None:
        if not self.via_shm:
            return super().reply(blocks)
        slots = self._reply_slots(blocks.shape[1], blocks.shape[2], blocks.dtype)
        if blocks.data_ptr() != slots.data_ptr():
            slots.copy_(blocks)
        self._post()

    def close(self) -> None:
        """Unmaps every lane."""
        for lane in self.lanes:
            if hasattr(lane, "mapped"):
                del lane.counters, lane.aborted, lane.announced, lane.mapped
                try:
                    lane.map.close()
                except BufferError:  # a view handed out is still alive; the mapping goes with it
                    pass


def _header_bytes(world_size: int) -> int:
    return (LANES * world_size + 1) * COUNTER_STRIDE  # every lane's counters, then the abort word


def _file_bytes(world_size: int, first_expert_rank: int, slot_bytes: int) -> int:
    a, r = first_expert_rank, world_size - first_expert_rank
    return _header_bytes(world_size) + LANES * 2 * a * r * slot_bytes  # per lane: dispatch slots, combine slots


def create_file(world_size: int, first_expert_rank: int, slot_bytes: int) -> str:
    """Rank 0: a new zeroed file in /dev/shm sized for the group; its path."""
    path = f"/dev/shm/llama4serve-ep-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, _file_bytes(world_size, first_expert_rank, slot_bytes))
    finally:
        os.close(fd)
    return path
