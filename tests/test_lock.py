"""The locks `make env` installs from agree with the top-level lists and with the Makefile (no network)."""
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"cpu": ROOT / "requirements-cpu.lock", "cuda": ROOT / "requirements-cuda.lock"}
TOP = {"cpu": ROOT / "requirements.txt", "cuda": ROOT / "requirements-cuda.in"}


def top_level(path):
    """Requirements of a hand-edited list, following `-r other.txt`."""
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            reqs += top_level(path.parent / line[3:].strip())
        else:
            reqs.append(Requirement(line))
    return reqs


def pins(path):
    """{canonical name: Version} of a lock; every entry must be an exact `name==version`."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        assert m, f"{path.name}: not an exact pin: {line!r}"
        name = canonicalize_name(m[1])
        assert name not in out, f"{path.name}: {name} pinned twice"
        out[name] = Version(m[2])
    return out


def makefile_torch():
    m = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no `TORCH ?= torch==<version>` line"
    return Version(m[1])


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_every_top_level_requirement_is_pinned_in_the_lock(kind):
    locked = pins(LOCKS[kind])
    for req in top_level(TOP[kind]):
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} ({TOP[kind].name}) is missing from {LOCKS[kind].name}: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{LOCKS[kind].name} pins {name}=={locked[name]}, but {TOP[kind].name} asks for {req}: run `make lock`")


def test_torch_pins_agree():
    want = makefile_torch()
    (req,) = [r for r in top_level(TOP["cpu"]) if r.name == "torch"]
    assert str(req.specifier) == f"=={want}", f"requirements.txt has {req}, the Makefile installs torch=={want}"
    cpu, cuda = pins(LOCKS["cpu"])["torch"], pins(LOCKS["cuda"])["torch"]
    assert cpu.public == cuda.public == str(want)
    assert cpu.local == "cpu", f"requirements-cpu.lock must be resolved against the CPU wheel, got torch=={cpu}"


def test_torchvision_is_the_one_built_for_that_torch():
    torch, vision = makefile_torch(), pins(LOCKS["cuda"])["torchvision"]
    assert (vision.major, vision.minor) == (0, torch.minor + 15), f"torchvision {vision} is not built for torch {torch}"


def test_cpu_lock_has_no_cuda_packages():
    cuda_only = [n for n in pins(LOCKS["cpu"])
                 if n.startswith(("nvidia-", "cuda-")) or n in ("triton", "torchvision", "open-clip-torch")]
    assert not cuda_only, f"requirements-cpu.lock would install {cuda_only}"


def test_the_two_locks_agree_on_shared_packages():
    cpu, cuda = pins(LOCKS["cpu"]), pins(LOCKS["cuda"])
    differ = {n: (str(cpu[n]), str(cuda[n])) for n in cpu.keys() & cuda.keys()
              if n != "torch" and cpu[n] != cuda[n]}
    assert not differ, f"the CPU and CUDA locks pin these differently: {differ}"
    assert cpu.keys() <= cuda.keys(), f"only in the CPU lock: {sorted(cpu.keys() - cuda.keys())}"
