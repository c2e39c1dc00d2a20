"""Test matrix: one environment per framework, each at its real release and dependency ranges.

The frameworks cannot share an environment (LLaMA-Factory 0.9.5 pins trl<=0.24 and
transformers<=5.6; ms-swift 4.6.0 pins trl<1.0; TRL's current line is 1.16), so each
gets its own virtualenv. They do share one torch: torch 2.14.1 + torchvision 0.29.1
(the pair that loads together here and that Qwen2-VL's processor needs) is installed
once into a cache folder and linked into every environment with a ``.pth`` file, so
pip sees it as installed and never downloads another multi-GB torch.

Run everything: ``nox``. One framework: ``nox -s trl`` (or llamafactory, swift). The slow
fault-injection suites: ``nox -s reliability``, and FSDP2's other model × tuning cells: ``nox -s fsdp2_matrix``
(after the three, in their environments).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import nox
from nox.command import CommandFailed

PYTHON = "3.11"  # the local torch wheels are cp311
TORCH_REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1")
SHARED_TORCH = Path(
    os.environ.get("VLM_DPO_SHARED_TORCH", Path.home() / ".cache" / "vlm-dpo-plugins" / "torch-2.14.1-tv0.29.1")
)
ROOT = Path(__file__).parent
TEST_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "VLM_DPO_LOAD_PLUGINS": "none",  # no stray installed third-party plugin leaks into the tests
    # Two pytest-xdist workers share the two cores of CI; a second thread per worker would only oversubscribe them.
    "OMP_NUM_THREADS": "1",
}
PARALLEL = ("-n", "2")
"""pytest-xdist: the tests are mostly single-core framework runs, so two workers cut CI's wall time by about 1.4x."""
CORE_TESTS = ("tests/core", "tests/fixtures")
CONSTRAINTS = ("--constraint", str(ROOT / "tests" / "envs" / "constraints.txt"))

# fsdp2_matrix is not among them: with it CI's run took 49 of its 50 minutes (docs/testing.md).
nox.options.sessions = ["trl", "llamafactory", "swift", "reliability"]
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True


def ensure_shared_torch(session: nox.Session) -> None:
    marker = SHARED_TORCH / ".complete"
    if marker.exists():
        return
    SHARED_TORCH.parent.mkdir(parents=True, exist_ok=True)
    with open(SHARED_TORCH.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two nox processes must not half-install the same folder
        if marker.exists():
            return
        staging = SHARED_TORCH.with_name(SHARED_TORCH.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        session.run_install("python", "-m", "pip", "install", "--quiet", "--target", str(staging), *TORCH_REQUIREMENTS)
        shutil.rmtree(SHARED_TORCH, ignore_errors=True)
        staging.rename(SHARED_TORCH)
        marker.touch()


def link_shared_torch(session: nox.Session) -> None:
    ensure_shared_torch(session)
    site_packages = session.run_install(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    ).strip()
    # Appended after the venv's own site-packages, so a package the environment pins itself wins.
    (Path(site_packages) / "_vlm_dpo_shared_torch.pth").write_text(f"{SHARED_TORCH}\n")


def model_results(name: str) -> Path:
    """The cells of docs/models.md one session's tests record (``model_support`` marks)."""
    return ROOT / ".nox" / f"model-results-{name}.jsonl"


MODELS_PAGE = ROOT / "docs" / "models.md"


def run_tests(session: nox.Session, *paths: str, browser: bool = False) -> None:
    session.run("python", "-c", "import torch, torchvision; print('torch', torch.__version__, torchvision.__version__)")
    results = model_results(session.name)
    results.unlink(missing_ok=True)
    env = {**TEST_ENVIRONMENT, "VLM_DPO_MODEL_RESULTS": str(results)}
    if not browser:
        # The report's headless-Chromium test runs in the trl session only (playwright is installed there).
        env["VLM_DPO_REQUIRE_CHROMIUM"] = "0"
    # The slow fault-injection suites run in the `reliability` session, and the FSDP2 matrix's other cells in the
    # `fsdp2_matrix` one, in these same environments.
    selection = "not reliability and not fsdp2_matrix"
    session.run("pytest", *PARALLEL, *CORE_TESTS, *paths, "-m", selection, *session.posargs, env=env)


@nox.session(python=PYTHON)
def trl(session: nox.Session) -> None:
    """TRL's current release line (1.16), transformers latest, and DeepSpeed ZeRO 1-3 live on CPU."""
    link_shared_torch(session)
    session.install("trl==1.16.0", "peft", ".[trl,test]", "playwright>=1.50,<2", *CONSTRAINTS)
    # DS_BUILD_OPS=0: nothing compiled at install; the one CPU op the tests need is built on first use
    # and cached outside the environment (TORCH_EXTENSIONS_DIR, see tests/deepspeed/conftest.py).
    session.install("deepspeed==0.19.8", *CONSTRAINTS, env={"DS_BUILD_OPS": "0"})
    run_tests(session, "tests/adapters/trl", "tests/demo", "tests/deepspeed", "tests/sharded", browser=True)


@nox.session(python=PYTHON)
def llamafactory(session: nox.Session) -> None:
    """LLaMA-Factory 0.9.5 with the ranges it pins (trl<=0.24, transformers<=5.6, peft 0.18, datasets<=4.0)."""
    link_shared_torch(session)
    # LLaMA-Factory requires torchaudio, and no torchaudio release loads beside this torch. A stub
    # distribution satisfies the requirement in this test environment only (see docs/testing.md).
    session.install(str(ROOT / "tests" / "envs" / "torchaudio_stub"))
    session.install("llamafactory==0.9.5", ".[test]", *CONSTRAINTS)
    # LLaMA-Factory's own DeepSpeed path (its `deepspeed:` key) runs on CPU too; nothing compiled at install.
    session.install("deepspeed==0.19.8", *CONSTRAINTS, env={"DS_BUILD_OPS": "0"})
    run_tests(session, "tests/adapters/llamafactory")


@nox.session(python=PYTHON)
def swift(session: nox.Session) -> None:
    """ms-swift 4.6.0 with the ranges it pins (trl<1.0, transformers<5.20)."""
    link_shared_torch(session)
    # decord: qwen-vl-utils reads the video tests' clips with it (torchvision 0.29 has no read_video). msgspec:
    # ms-swift 4.6's DPO trainer imports it under --fsdp without declaring it (docs/swift.md).
    session.install("ms-swift==4.6.0", "qwen-vl-utils", "decord==0.6.0", "msgspec", ".[test]", *CONSTRAINTS)
    # ms-swift's own --deepspeed path runs on CPU too; nothing compiled at install.
    session.install("deepspeed==0.19.8", *CONSTRAINTS, env={"DS_BUILD_OPS": "0"})
    run_tests(session, "tests/adapters/swift")


RELIABILITY_TESTS = {
    "trl": ("tests/adapters/trl", "tests/deepspeed", "tests/sharded"),
    "llamafactory": ("tests/adapters/llamafactory",),
    "swift": ("tests/adapters/swift",),
}
"""Where each environment's tests marked ``reliability`` live."""
RELIABILITY_PAGE = ROOT / "docs" / "reliability.md"


def environment_pytest(session: nox.Session, environment: str) -> Path:
    """The pytest of an environment a framework session built."""
    pytest = ROOT / ".nox" / environment / "bin" / "pytest"
    if not pytest.exists():
        session.error(f"{pytest} is missing: run `nox -s {environment}` first (it builds that environment)")
    return pytest


@nox.session(venv_backend="none")
def reliability(session: nox.Session) -> None:
    """Fault injection through every framework, then docs/reliability.md's table checked against the results.

    Runs in the environments the trl, llamafactory and swift sessions built (run those first; plain ``nox``
    does). ``nox -s reliability -- write`` rewrites the table from this run instead of checking it; the same goes
    for docs/models.md's table, from the cells this session and the three before it recorded.
    """
    results = ROOT / ".nox" / "reliability-results.jsonl"
    results.unlink(missing_ok=True)
    cells = model_results(session.name)
    cells.unlink(missing_ok=True)
    env = {
        **TEST_ENVIRONMENT,
        "VLM_DPO_REQUIRE_CHROMIUM": "0",
        "VLM_DPO_RELIABILITY_RESULTS": str(results),
        "VLM_DPO_MODEL_RESULTS": str(cells),
    }
    failures = []
    for environment, paths in RELIABILITY_TESTS.items():
        pytest = environment_pytest(session, environment)
        try:
            session.run(str(pytest), *PARALLEL, "-m", "reliability", *paths, env=env, external=True)
        except CommandFailed:
            failures.append(environment)  # the table still gets written or checked, showing which cells failed
    mode = "--write" if "write" in session.posargs else "--check"
    session.run(
        "python3",
        str(ROOT / "scripts" / "reliability_table.py"),
        str(results),
        mode,
        str(RELIABILITY_PAGE),
        external=True,
    )
    sessions = (*RELIABILITY_TESTS, session.name)
    session.run(
        "python3",
        str(ROOT / "scripts" / "models_table.py"),
        *(str(model_results(name)) for name in sessions),
        mode,
        str(MODELS_PAGE),
        external=True,
    )
    if failures:
        session.error(f"fault suites failed in: {', '.join(failures)}")


FSDP2_MATRIX_TESTS = {
    "trl": ("tests/sharded/test_fsdp2_through_trl.py",),
    "llamafactory": ("tests/adapters/llamafactory/test_fsdp2_matrix.py",),
    "swift": ("tests/adapters/swift/test_fsdp2_matrix.py",),
}
"""Where each environment's tests marked ``fsdp2_matrix`` live."""


@nox.session(venv_backend="none")
def fsdp2_matrix(session: nox.Session) -> None:
    """The FSDP2 model × tuning cells the framework sessions leave out (tests marked ``fsdp2_matrix``; the sessions
    run each model and each tuning at least once), in the environments the three sessions built: a slow matrix of
    its own, run by hand after the others (``nox -s fsdp2_matrix``), since CI's run has no room for it
    (docs/testing.md)."""
    env = {**TEST_ENVIRONMENT, "VLM_DPO_REQUIRE_CHROMIUM": "0"}
    for environment, paths in FSDP2_MATRIX_TESTS.items():
        pytest = environment_pytest(session, environment)
        session.run(str(pytest), *PARALLEL, "-m", "fsdp2_matrix", *paths, env=env, external=True)
