"""The floor for a streaming weighted sum in torch: the least work any merge of these files does.

What it does
    ``python benchmarks/merge_floor.py OUT_FILE MODEL_FOLDER...`` reads every tensor of the
    given safetensors folders (same tensor names in each) in row chunks of 1M entries with
    ``preadv`` into reused buffers, converts each chunk to float32, adds it into a float32
    accumulator (one ``add_`` per input), casts the sum back to the stored dtype, writes it
    with ``pwrite`` into OUT_FILE (tensors back to back, no header) and keeps a running
    sha256 of OUT_FILE in write order; two worker threads take one tensor each, torch runs
    one intra-op thread, as in ``deltawise merge``.

    That is the irreducible core of ``linear`` and ``task_arithmetic``: read, convert,
    accumulate, cast, write, checksum -- no recipe, plan, parameter handling, NaN screen,
    staging folder or progress. ``merge_speed.py`` runs it in a subprocess on the same input
    files as each merge (Python start and ``import torch`` included, as for the merges) to
    show how close the engine gets to what plain torch op-by-op code reaches on this machine.
    It is a measuring tool, not a merge: its output file is not a model and is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CHUNK = 1 << 20
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def tensor_layout(folder: Path) -> dict[str, tuple[Path, int, int, list[int], torch.dtype]]:
    """name -> (file, absolute offset, bytes, shape, dtype) for every tensor of a folder."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for name, meta in header.items():
            begin, end = meta["data_offsets"]
            out[name] = (file, 8 + n + begin, end - begin, meta["shape"], DTYPES[meta["dtype"]])
    return out


def main(out_file: Path, folders: list[Path]) -> None:
    started = time.perf_counter()  # after Python start and `import torch`, like deltawise's own timing
    torch.set_num_threads(1)
    layouts = [tensor_layout(f) for f in folders]
    names = sorted(layouts[0], key=lambda k: -layouts[0][k][2])  # big first: both threads end together
    offsets, pos = {}, 0
    for name in sorted(layouts[0]):
        offsets[name] = pos
        pos += layouts[0][name][2]
    fds = {path: os.open(path, os.O_RDONLY) for lay in layouts for path, *_ in lay.values()}
    out_fd = os.open(out_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    local = threading.local()
    lock, hash_lock = threading.Lock(), threading.Lock()
    sha, hashed, written = hashlib.sha256(), [0], {}

    def hash_ready(data: memoryview, where: int) -> None:
        # in-order sha256 of the output: from memory when the chunk is next in line, else read
        # back from the page cache once the gap before it is filled (one hashing thread at a time)
        while hash_lock.acquire(blocking=False):
            try:
                while True:
                    with lock:
                        end = written.pop(hashed[0], None)
                    if end is None:
                        break
                    if hashed[0] == where:
                        sha.update(data)
                        hashed[0] = end
                        continue
                    while hashed[0] < end:
                        n = os.preadv(out_fd, [local.back[: end - hashed[0]]], hashed[0])
                        sha.update(local.back[:n])
                        hashed[0] += n
            finally:
                hash_lock.release()
            with lock:
                if hashed[0] not in written:
                    return

    def work(name: str) -> int:
        if not hasattr(local, "raw"):
            local.raw = torch.empty(CHUNK, dtype=torch.bfloat16)
            local.f, local.acc = torch.empty(CHUNK), torch.empty(CHUNK)
            local.out = torch.empty(CHUNK, dtype=torch.bfloat16)
            local.back = memoryview(bytearray(1 << 23))
        _, _, nbytes, _, dtype = layouts[0][name]
        if dtype.itemsize != 2:
            raise SystemExit(f"{name}: {dtype}; this loop handles 2-byte float checkpoints only")
        numel = nbytes // 2
        raw, out_buffer = local.raw.view(dtype), local.out.view(dtype)
        for start in range(0, numel, CHUNK):
            k = min(CHUNK, numel - start)
            acc, chunk = local.acc[:k], raw[:k]
            for i, layout in enumerate(layouts):
                path, offset, _, _, _ = layout[name]
                os.preadv(fds[path], [memoryview(chunk.view(torch.uint8).numpy())], offset + start * 2)
                if i == 0:
                    acc.copy_(chunk)
                else:
                    local.f[:k].copy_(chunk)
                    acc.add_(local.f[:k])
            out = out_buffer[:k].copy_(acc)
            data = memoryview(out.view(torch.uint8).numpy())
            where = offsets[name] + start * 2
            os.pwrite(out_fd, data, where)
            with lock:
                written[where] = where + len(data)
            hash_ready(data, where)
        return nbytes

    try:
        with ThreadPoolExecutor(2) as pool:
            total = sum(pool.map(work, names))
        seconds = time.perf_counter() - started
        print(f"{total} bytes out, sha256 {sha.hexdigest()[:16]} over {hashed[0]} bytes ({seconds:.2f} s)")
    finally:
        os.close(out_fd)
        out_file.unlink(missing_ok=True)
        for fd in fds.values():
            os.close(fd)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
