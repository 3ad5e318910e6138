"""The compiled decode step, built ahead of its use: no conversation ever waits on a compile.

A compiled step (:mod:`.step`, C.2) needs one graph per ``(bucket, slots)`` shape, and on this
project's 2-core CPU a graph takes a minute or more to build: built on first use, as the step
does on its own, it would stall every conversation of the batch meanwhile. So the engine serves
with the eager step from the start, and a :class:`Precompiler` builds the graphs elsewhere:

1. **A child process** (``python -m streaming_llm.engines.precompile``, niced to 19)
   loads the same model, builds the same step and compiles each wanted shape on blank buffers.
   Inductor writes what it built to its cache, which lives in the data dir, in a folder keyed by
   everything a graph depends on (:func:`folder_key`); the child lists the shapes it finished in
   ``shapes.json`` there. A process apart, because a compile is minutes of Python (the GIL) and
   of C++ compilers, and a second OpenMP team in the serving process slows every step.
2. **The scheduler's thread, while no conversation decodes**, takes a finished shape into the
   serving step (:meth:`~.step.LlamaStep.prepare`): inductor's cache makes that a load of a few
   seconds, not a compile, and the step runs that shape compiled from its next call on. A turn
   that arrives during a load waits for that one load.

The wanted shapes are the batch buckets (1, 2, 4, ... ``max_batch``) at the buffer size of a
cache of ``sink_tokens + window`` tokens, plus every shape the step ran eager for want of a graph
(an agent whose pinned prefix needs a larger buffer). What was built stays: a restart loads the
listed shapes and starts no child. A failed child logs one warning and the step stays eager.

The folder is ``<data_dir>/compile/<key>``: torch version, CPU capability (or CUDA device), model
fingerprint, weights mode and batch rows, and a digest of the step's own code, so a change to any
of them builds afresh instead of trusting a graph built for something else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .batch_cache import bucket_size, slots_for
from .step import LlamaStep, Shape

__all__ = ["Precompiler", "folder_key", "wanted_shapes"]

log = logging.getLogger(__name__)

SHAPES = "shapes.json"  # the shapes the child finished, in its folder
LOG = "compile.log"  # the child's output


def wanted_shapes(rows: int, capacity: int) -> list[Shape]:
    """Every batch bucket of ``rows`` rows at the buffer size of a ``capacity``-token cache."""
    buckets = sorted({bucket_size(n, rows) for n in range(1, rows + 1)})
    return [(b, slots_for(capacity)) for b in buckets]


def folder_key(*, fingerprint: str, quantize: str, dtype: str, rows: int, device: str) -> str:
    """The name of the compile folder: what a graph built there depends on."""
    import torch

    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        where = f"sm{major}{minor}"
    else:
        where = torch.backends.cpu.get_cpu_capability().lower()
    code = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("step.py", "weights.py", "batch_cache.py"):
        code.update((here / name).read_bytes())
    version = torch.__version__.replace("+", "-")
    return (f"torch{version}-{where}-{fingerprint[:12]}-{quantize}-{dtype}-rows{rows}"
            f"-{code.hexdigest()[:8]}")


def _read_shapes(folder: Path) -> set[Shape]:
    try:
        data = json.loads((folder / SHAPES).read_text())
        return {(int(b), int(s)) for b, s in data["shapes"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_shapes(folder: Path, shapes: Iterable[Shape]) -> None:
    partial = folder / f"{SHAPES}.partial-{os.getpid()}"
    partial.write_text(json.dumps({"shapes": sorted(shapes)}))
    partial.replace(folder / SHAPES)


class Precompiler:
    """Builds a compiled step's graphs in a child process and takes them in while idle.

    ``spec`` is what the child needs to build the same step: ``source`` (the model folder),
    ``dtype``, ``device``, ``quantize``, ``rows`` and ``threads``. Driven by the scheduler's thread through
    :meth:`idle`; :meth:`status` is read from any thread.
    """

    def __init__(self, step: LlamaStep, folder: Path, spec: dict[str, Any],
                 wanted: Iterable[Shape]) -> None:
        self.step, self.folder, self.spec = step, folder, spec
        self.folder.mkdir(parents=True, exist_ok=True)
        self._built = _read_shapes(folder)
        self._wanted: set[Shape] = set(wanted) | self._built
        self._child: subprocess.Popen[bytes] | None = None
        self._asked: set[Shape] = set()  # shapes the running child builds
        self._failed = False
        self._loaded_seconds = 0.0
        self.state = "loading" if not self._wanted - self._built else "compiling"

    def status(self) -> dict[str, Any]:
        """For /health: state (compiling / loading / ready / failed), shapes, seconds."""
        return {"state": self.state, "shapes": len(self._wanted),
                "built": len(self._built), "running": len(self.step.compiled_shapes),
                "load_seconds": round(self._loaded_seconds, 1), "folder": str(self.folder)}

    def idle(self) -> bool:
        """One piece of work while nothing decodes; whether more is pending (poll again soon)."""
        if self._failed:
            return False
        self._wanted |= self.step.missing
        self._poll()
        if self._failed:
            return False
        loadable = sorted(self._built - self.step.compiled_shapes)
        if loadable:
            seconds = self.step.prepare(self.spec["rows"], loadable[0])
            if seconds is None:  # the step fell back to eager
                self._fail("loading a built graph failed")
                return False
            self._loaded_seconds += seconds
        todo = self._wanted - self._built
        if todo and self._child is None:
            self._start(todo)
        if not todo and not self._built - self.step.compiled_shapes:
            self.state = "ready"
            return False
        self.state = "compiling" if todo else "loading"
        return True

    def close(self) -> None:
        """Stop a running child (it resumes from its cache at the next start)."""
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        self._child = None

    def _start(self, shapes: set[Shape]) -> None:
        spec = {**self.spec, "folder": str(self.folder), "shapes": sorted(shapes),
                "parent": os.getpid()}
        log.info("decode step: compiling %d shape(s) in the background (%s); eager until then",
                 len(shapes), self.folder)
        with open(self.folder / LOG, "ab") as out:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "streaming_llm.engines.precompile"],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(self.folder / "inductor")})
        assert self._child.stdin is not None
        self._child.stdin.write(json.dumps(spec).encode())
        self._child.stdin.close()
        self._asked = shapes

    def _poll(self) -> None:
        """What the running child has built so far (the file is only read while one runs)."""
        if self._child is None:
            return
        self._built = _read_shapes(self.folder)
        if self._child.poll() is None:
            return
        code, self._child = self._child.returncode, None
        if code != 0 or not self._asked <= self._built:
            self._fail(f"the compiling process exited with {code}; see {self.folder / LOG}")

    def _fail(self, why: str) -> None:
        log.warning("decode step: %s; serving the eager step", why)
        self._failed, self.state = True, "failed"


def _child(spec: dict[str, Any]) -> None:
    """Build ``spec``'s shapes into the inductor cache the parent set, listing each when done."""
    os.nice(19)
    import torch
    from torch._inductor import config as inductor_config
    from transformers import AutoModelForCausalLM

    # The parent's thread count: inductor builds it into the kernels (and its cache key).
    torch.set_num_threads(spec["threads"])
    inductor_config.compile_threads = 1
    folder = Path(spec["folder"])
    model = AutoModelForCausalLM.from_pretrained(spec["source"],
                                                 dtype=getattr(torch, spec["dtype"]))
    model.to(spec["device"]).eval()
    step = LlamaStep(model, quantize=spec["quantize"], compile=True, ahead=True)
    for bucket, slots in spec["shapes"]:
        if os.getppid() != spec["parent"]:  # the server is gone (killed): its next start asks
            sys.exit("the server that asked for these shapes has exited")
        started = time.perf_counter()
        if step.prepare(spec["rows"], (bucket, slots)) is None:
            sys.exit(f"compiling batch {bucket} ({slots} slots) failed")
        _write_shapes(folder, _read_shapes(folder) | {(bucket, slots)})
        print(f"built batch {bucket} ({slots} slots) in {time.perf_counter() - started:.1f} s",
              flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _child(json.loads(sys.stdin.read()))
