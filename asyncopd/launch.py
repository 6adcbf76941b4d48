"""The entry point: ``torchrun -m asyncopd.launch [hydra overrides]``.

::

    python -m asyncopd.launch -m k=a,b   a sweep: one such job per combination (asyncopd.sweep)
    python -m asyncopd.launch run.seeds=3  replicates (with -m: of every combination), then a report
    python -m asyncopd.launch ...        compose + validate + build demo models, then
        └─ torchrun --nproc-per-node=L+A+T -m asyncopd.launch ...
              rank [0, L)        learner  (FSDP2 group; rank 0: buffer, metrics, weights out)
              rank [L, L+A)      actor    (vLLM engine)
              rank [L+A, L+A+T)  teacher  (scorer; none with teacher.backend=colocated)

Every rank composes the same config (hydra Compose API: ``configs/<name>.yaml``
plus overrides), converts it to the typed :class:`~asyncopd.config.JobConfig`
once, and runs one role. A role that raises exits non-zero with its traceback,
and torchrun then ends the other ranks. This is the only module that touches
``os.environ`` (thread budgets, vLLM settings, the generated job key, and each
rank's ``CUDA_VISIBLE_DEVICES`` from :mod:`asyncopd.placement`, set before torch is
imported).

Before a role opens a socket, its process installs the job's ZeroMQ security
(``cluster.auth``; see :mod:`asyncopd.transport.security`). A single-node job
started here gets a CURVE key made in memory and handed to its ranks in the
environment; a multi-node job reads ``cluster.auth_key_file`` on every node.

Faults. Before any rank starts, :mod:`asyncopd.preflight` checks data files,
the run directory and model directories, and the run directory's lock is probed
(:mod:`asyncopd.rundir`; learner rank 0 holds it for the job). Under ``torchrun
--max-restarts`` each restart attempt scopes its store keys (TORCHELASTIC_RESTART_COUNT)
and resumes from the last checkpoint (``learner.resume=auto``). A failing role's
last line names role, index, rank and exception (also recorded for torchrun's
error summary); a job started here ends with the launcher's verdict on which
rank failed first (:mod:`asyncopd.failures`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from asyncopd import trace
from asyncopd.config import ConfigError, JobConfig, from_dict
from asyncopd.failures import STATUS_DIR_ENV, RankStatus, describe_failure
from asyncopd.preflight import preflight
from asyncopd.sweep import MULTIRUN_FLAGS, run_sweep

if TYPE_CHECKING:
    from asyncopd.placement import Placement
    from asyncopd.transport.security import CurveSecurity

__all__ = ["main", "compose_config", "resolve_model_paths", "check_teacher_server", "world_environment",
           "install_security"]

logger = logging.getLogger("asyncopd.launch")

_RUN_DIR_LOCK = None

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "default"


def _split_args(argv: list[str]) -> tuple[str, Path, list[str]]:
    name, config_dir, overrides = DEFAULT_CONFIG, CONFIG_DIR, []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config-name"):
            name = arg.split("=", 1)[1] if "=" in arg else next(args)
        elif arg.startswith("--config-dir"):
            config_dir = Path(arg.split("=", 1)[1] if "=" in arg else next(args)).resolve()
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}. Fix: pass hydra overrides as key=value, "
                              "plus optionally --config-name NAME / --config-dir DIR and -m (a sweep).")
        else:
            overrides.append(arg)
    return name, config_dir, overrides


def compose_config(argv: list[str]) -> JobConfig:
    """Compose ``configs/<name>.yaml`` with overrides into a validated JobConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    name, config_dir, overrides = _split_args(argv)
    if not (config_dir / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in config_dir.glob("*.yaml"))
        raise ConfigError(f"--config-name={name!r}: no {config_dir / (name + '.yaml')}. Fix: use one of {known}.")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            composed = compose(config_name=name, overrides=overrides)
        data = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"{exc}. Fix: check the spelling of the override (fields are listed in "
                          "asyncopd/config/); use key=value for an existing field.") from None
    return from_dict(data)


def resolve_model_paths(cfg: JobConfig) -> tuple[str, str | None]:
    """(student, teacher) model directories; builds and caches the demo models when
    a path is unset; fails clearly on a missing path or mismatched tokenizers. The
    teacher is None with teacher.backend=vllm_http: the server holds it, and the
    tokenizer check runs against the server (or teacher.tokenizer)."""
    remote = cfg.teacher.backend == "vllm_http"
    if remote and cfg.model.teacher.path is not None:
        raise ConfigError(f"model.teacher.path={cfg.model.teacher.path!r}: unused with teacher.backend=vllm_http "
                          "(the server at teacher.url holds the teacher). Fix: remove model.teacher.path; to check "
                          "tokenizers against a local copy set teacher.tokenizer=<its directory>.")
    student, teacher = cfg.model.student.path, cfg.model.teacher.path
    if student is None or (teacher is None and not remote):
        if cfg.task.name == "chat":
            from asyncopd.tasks.smollm2 import ensure_smollm2_models as ensure_demo_models
        else:
            from asyncopd.tasks.demo import ensure_demo_models

        demo_teacher, demo_student = ensure_demo_models(cfg.task)
        student = student or str(demo_student)
        teacher = None if remote else teacher or str(demo_teacher)
    fields = [("model.student.path", student)] + ([] if teacher is None else [("model.teacher.path", teacher)])
    for field, path in fields:
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{field}={path!r} has no config.json. Fix: point it at a Hugging Face model "
                              "directory (save_pretrained output).")
    if teacher is not None:
        check_tokenizers(student, teacher)
    else:
        check_teacher_server(cfg, student)
    return student, teacher


def check_tokenizers(student: str, teacher: str, teacher_field: str = "model.teacher.path") -> None:
    from transformers import AutoTokenizer

    try:
        tok_s, tok_t = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    except OSError as exc:
        raise ConfigError(f"cannot load a tokenizer: {exc}. Fix: check model.student.path and "
                          f"{teacher_field} (local Hugging Face directories).") from None
    vocab_s, vocab_t = tok_s.get_vocab(), tok_t.get_vocab()
    if vocab_s != vocab_t or tok_s.eos_token_id != tok_t.eos_token_id:
        differing = sorted(set(vocab_s.items()) ^ set(vocab_t.items()))[:5]
        raise ConfigError(
            f"the student ({student}) and teacher ({teacher}) tokenizers differ (vocab sizes {len(vocab_s)} vs "
            f"{len(vocab_t)}, eos {tok_s.eos_token_id} vs {tok_t.eos_token_id}, e.g. {differing}). On-policy "
            "distillation scores the student's tokens with the teacher, so both must share one tokenizer. "
            "Fix: choose a teacher from the student's model family."
        )


def check_teacher_server(cfg: JobConfig, student: str) -> None:
    """teacher.backend=vllm_http: the server is up, serves the named model with room
    for actor.max_model_len tokens, and tokenizes like the student (checked on the
    server, or locally against teacher.tokenizer when set)."""
    from transformers import AutoTokenizer

    from asyncopd.teacher.http import TeacherServer, TeacherServerError, check_served_tokenizer

    teacher = cfg.teacher
    if teacher.tokenizer is not None:
        check_tokenizers(student, teacher.tokenizer, teacher_field="teacher.tokenizer")
    try:
        with TeacherServer.from_config(teacher) as server:
            server.wait_until_up(cfg.cluster.startup_timeout_s)
            model = server.resolve_model(teacher.served_model)
            if model.max_model_len is not None and model.max_model_len < cfg.actor.max_model_len:
                raise ConfigError(
                    f"actor.max_model_len={cfg.actor.max_model_len}: the teacher server at {teacher.url} accepts "
                    f"only {model.max_model_len} tokens per sequence. Fix: restart it with --max-model-len >= "
                    f"{cfg.actor.max_model_len}, or lower actor.max_model_len.")
            if teacher.tokenizer is None:
                check_served_tokenizer(server, model.id, AutoTokenizer.from_pretrained(student))
    except TeacherServerError as exc:
        raise ConfigError(str(exc)) from None


def _setup_logging(level: str, tag: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr, force=True,
                        format=f"%(asctime)s {tag} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def plan_devices(cfg: JobConfig, *, procs_per_node: int, num_nodes: int,
                 model_paths: tuple[str, str | None] | None = None) -> Placement:
    """Every rank's device (asyncopd.placement) from this node's visible GPUs; with
    ``model_paths`` (student, teacher) also checks that each role's memory share fits."""
    from asyncopd.placement import ModelSizes, estimate_num_params, parse_visible_gpus, plan_placement, query_nvidia_smi

    smi = None if cfg.cluster.device == "cpu" else query_nvidia_smi()
    gpus = parse_visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), smi)
    sizes = None
    if model_paths is not None:
        student = estimate_num_params(model_paths[0])
        teacher = None if model_paths[1] is None else estimate_num_params(model_paths[1])
        sizes = None if student is None else ModelSizes(student, teacher)
    return plan_placement(cfg, procs_per_node=procs_per_node, num_nodes=num_nodes, gpus=gpus, sizes=sizes)


def _spawn_torchrun(cfg: JobConfig, argv: list[str]) -> int:
    """Not under torchrun: prepare once (demo models), then start the world."""
    from asyncopd.rundir import probe_run_dir

    env = world_environment(cfg)  # an unusable key file fails before the slow part
    preflight(cfg)
    probe_run_dir(cfg.run.run_dir)  # another job in this run directory: fail before starting anything
    paths = resolve_model_paths(cfg)  # build caches before ranks race for them; fail early on bad paths
    logger.info("%s", plan_devices(cfg, procs_per_node=cfg.cluster.world_size, num_nodes=1,
                                   model_paths=paths).describe())  # an impossible layout fails here
    # torchrun itself, with its stores listening on 127.0.0.1 only (see transport/loopback_store.py).
    command = [sys.executable, "-m", "asyncopd.transport.loopback_store", "--standalone", "--local-addr=127.0.0.1",
               f"--nproc-per-node={cfg.cluster.world_size}", "-m", "asyncopd.launch", *argv]
    logger.info("objective: %s", cfg.objective)
    logger.info("starting %s", " ".join(command))
    with tempfile.TemporaryDirectory(prefix="asyncopd-status-") as status_dir:
        code = subprocess.call(command, env={**env, STATUS_DIR_ENV: status_dir})
        if code != 0:
            verdict = describe_failure(Path(status_dir)) or [
                f"torchrun exited with {code} before any role reported (see torchrun's messages above)"]
            for line in verdict:
                logger.error("job failed: %s", line)
    return code


def world_environment(cfg: JobConfig) -> dict[str, str]:
    """The environment of the single-node world started here: ours, plus a job key
    made now when CURVE is on and no key file gives one (so all ranks share it)."""
    from asyncopd.transport.security import JOB_SECRET_ENV, job_key_for

    env = dict(os.environ)
    key = job_key_for(cfg.cluster, inherited_secret=None, num_nodes=1, can_generate=True)
    if key is not None and cfg.cluster.auth_key_file is None:
        env[JOB_SECRET_ENV] = key.secret.decode()
    return env


def install_security(cfg: JobConfig) -> CurveSecurity | None:
    """CURVE (or nothing) for every socket this process will open, per cluster.auth."""
    from asyncopd.transport.security import JOB_SECRET_ENV, job_key_for
    from asyncopd.transport.sockets import configure_security

    num_nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    cfg.cluster.check_num_nodes(num_nodes)
    # Popped so that the engine's own subprocesses do not inherit the secret.
    inherited = os.environ.pop(JOB_SECRET_ENV, None)
    key = job_key_for(cfg.cluster, inherited_secret=inherited, num_nodes=num_nodes, can_generate=False,
                      shared_key_dir=cfg.run.run_dir)
    security = configure_security(key)
    if key is None:
        who = "any local process" if cfg.cluster.host_is_loopback else "anyone who reaches that address"
        logger.warning("cluster.auth=none with cluster.host=%s: %s can inject rollouts and control messages "
                       "(a Shutdown ends the job)", cfg.cluster.host, who)
    return security


def _rank_identity(cfg: JobConfig) -> tuple[str, int, int, int]:
    """(role, index within the role, global rank, restart attempt) of this process."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg.cluster.check_world_size(world_size)
    role, index = cfg.cluster.role_of(rank)
    return role, index, rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _on_sigterm(status: RankStatus):
    def handler(signum, frame) -> None:  # torchrun ends the world because another rank failed
        status.terminated()
        os._exit(128 + signum)
    return handler


def _run_rank(cfg: JobConfig, status: RankStatus) -> None:
    role, index, rank, attempt = _rank_identity(cfg)
    # Before torch is imported: this process sees only its own GPUs.
    world_size = int(os.environ["WORLD_SIZE"])
    procs_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    placement = plan_devices(cfg, procs_per_node=procs_per_node,
                             num_nodes=int(os.environ.get("GROUP_WORLD_SIZE", "1")))
    os.environ.update(placement.for_rank(rank).environment())
    from asyncopd.threads import available_cores, rank_threads, thread_environment

    layout = dict(node=rank // procs_per_node, procs_per_node=procs_per_node, cores=available_cores())
    threads = rank_threads(cfg.cluster, role, **layout)
    os.environ.update(thread_environment(cfg.cluster, **layout))  # before torch: OpenMP reads it once
    _setup_logging(cfg.run.log_level, f"[{role} {index}]")
    signal.signal(signal.SIGTERM, _on_sigterm(status))
    preflight(cfg)
    if role == "learner" and index == 0:
        from asyncopd.rundir import acquire_run_dir

        global _RUN_DIR_LOCK  # held for the process's life; the kernel drops it when the process ends
        _RUN_DIR_LOCK = acquire_run_dir(cfg.run.run_dir, job_id=os.environ.get("TORCHELASTIC_RUN_ID", "none"),
                                        attempt=attempt)
    trace.configure(cfg.run.run_dir if cfg.run.trace else None, role, index)
    security = install_security(cfg)
    # Quiet third-party chatter unless debugging (a user's own setting wins).
    if cfg.run.log_level != "DEBUG":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if role == "actor" or (role == "teacher" and cfg.teacher.backend == "vllm"):
        from asyncopd.actor.engine import engine_environment, fix_malloc_mmap_threshold

        os.environ.update(engine_environment(threads, onednn_cache_capacity=cfg.actor.onednn_cache_capacity))
        fix_malloc_mmap_threshold(cfg.actor.malloc_mmap_threshold)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    if cfg.run.log_level != "DEBUG":
        hf_logging.disable_progress_bar()
    student, teacher = resolve_model_paths(cfg)
    from asyncopd.tasks import load_task
    from asyncopd.transport.discovery import Rendezvous

    # Keys of a restarted world (torchrun --max-restarts) must not meet the dead one's.
    rendezvous = Rendezvous.from_env(cfg.cluster.startup_timeout_s, attempt=attempt,
                                     signing_key=None if security is None else security.key.secret)
    if role == "learner":
        from asyncopd.buffer import StalenessBuffer
        from asyncopd.learner.worker import run_learner

        buffer = StalenessBuffer(batch_size=cfg.learner.batch_size, max_staleness=cfg.async_.max_staleness,
                                 capacity=cfg.buffer_capacity, group_size=cfg.actor.samples_per_prompt)
        from transformers import AutoTokenizer

        # The tokenizer renders messages-format prompts (only their number is used here).
        task = load_task(cfg.task, tokenizer=AutoTokenizer.from_pretrained(student))
        run_learner(cfg, index, rendezvous, student, buffer=buffer, num_eval_prompts=len(task.eval_prompts()),
                    teacher_path=teacher, placement=placement)
    elif role == "actor":
        from asyncopd.actor.worker import run_actor

        run_actor(cfg, index, rendezvous, student, placement=placement)
    else:
        from asyncopd.teacher.worker import run_teacher

        run_teacher(cfg, index, rendezvous, teacher, student_path=student, placement=placement)


def _record_for_torchrun(exc: BaseException) -> None:
    """Write the exception to torchrun's per-rank error file, so that its failure
    summary shows it instead of "To enable traceback see ..."."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # reporting must not hide the original error
        logger.debug("could not record the exception for torchrun", exc_info=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ
    _setup_logging("INFO", "[launch]")
    try:
        if any(arg in MULTIRUN_FLAGS for arg in argv):
            if under_torchrun:
                raise ConfigError("-m/--multirun under torchrun. Fix: start sweeps with `python -m asyncopd.launch "
                                  "-m key=a,b ...`, which runs one torchrun world per job.")
            name, config_dir, overrides = _split_args([a for a in argv if a not in MULTIRUN_FLAGS])
            return run_sweep([f"--config-name={name}", f"--config-dir={config_dir}"], overrides,
                             compose=compose_config, spawn=_spawn_torchrun)
        cfg = compose_config(argv)
        if cfg.run.seeds > 1:  # replicates are separate jobs: a sweep of one combination
            if under_torchrun:
                raise ConfigError(f"run.seeds={cfg.run.seeds} under torchrun runs one job. Fix: start replicates "
                                  "with `python -m asyncopd.launch run.seeds=N ...`, or set run.seed=<k> per job.")
            name, config_dir, overrides = _split_args(argv)
            return run_sweep([f"--config-name={name}", f"--config-dir={config_dir}"], overrides,
                             compose=compose_config, spawn=_spawn_torchrun)
        if not under_torchrun:
            return _spawn_torchrun(cfg, argv)
        role, index, rank, attempt = _rank_identity(cfg)
        status = RankStatus(os.environ.get(STATUS_DIR_ENV), role=role, index=index, rank=rank, attempt=attempt)
        status.running()
        try:
            _run_rank(cfg, status)
        except Exception as exc:
            status.failed(exc)
            _record_for_torchrun(exc)
            if not isinstance(exc, ConfigError):
                logger.exception("%s %d failed", role, index)
            # asyncopd's own last line: which role, which rank, what.
            logger.error("%s %d (rank %d, restart attempt %d) failed: %s: %s", role, index, rank, attempt,
                         "configuration error" if isinstance(exc, ConfigError) else type(exc).__name__, exc)
            sys.stderr.flush()
            return 2 if isinstance(exc, ConfigError) else 1
        status.finished()
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    except Exception:
        logger.exception("launch failed")
        sys.stderr.flush()
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo threads can abort the interpreter at exit after the work is done (see
    # shared/notes/fsdp-cpu.md); leave at once instead.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
