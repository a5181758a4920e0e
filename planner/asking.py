"""The planner's ``Ask`` from what a user typed: a model name or folder, budgets in GiB (2^30 bytes), a profile,
drafts, acceptance or a calibration file, and the workload (``specplan search`` and ``specplan validate``)."""

from __future__ import annotations

from specplan.catalog import load_model_spec, load_profile, model_config_path
from specplan.contracts.calibration import Calibration
from specplan.contracts.plan import Capacities, Workload
from specplan.errors import SpecplanError
from specplan.fmt import GiB
from specplan.jsonio import load
from specplan.planner.ask import Ask
from specplan.planner.drafts import choices



def make_ask(model: str, vram: float, ram: float | None, disk: float | None, profile_arg: str | None,
             drafts: tuple[str, ...], acceptance: float | None, calibration: str | None, prompt_len: int,
             gen_len: int, num_prompts: int, top: int, command: str | None = None) -> Ask:
    """``vram``, ``ram`` and ``disk`` in GiB (``ram`` None: the profile's host memory; ``disk`` None: unlimited);
    ``drafts`` empty: every draft that fits the model; ``command``: the invocation recorded in the plans."""
    spec = load_model_spec(model)
    profile = load_profile(profile_arg)
    cfg = model_config_path(model)
    local = str(cfg.parent) if cfg.name == "config.json" and any(cfg.parent.glob("*.safetensors")) else None
    if not profile.has_host_tier:
        if vram * GiB > profile.host.memory_bytes:
            raise SpecplanError(f"--vram {vram:g} GiB exceeds this machine's memory "
                                f"({profile.host.memory_bytes / GiB:.1f} GiB): device and host share it here")
        caps = Capacities(device_bytes=int(vram * GiB), disk_bytes=int(disk * GiB) if disk else None)
    else:
        caps = Capacities(device_bytes=int(vram * GiB), host_bytes=int((ram or profile.host.memory_bytes / GiB) * GiB),
                          disk_bytes=int(disk * GiB) if disk else None)
    calib = load(Calibration, calibration) if calibration else None
    draft_choices = choices(list(drafts) or None, spec, spec.name, acceptance, calib)
    workload = Workload(prompt_len=prompt_len, gen_len=gen_len, num_prompts=num_prompts)
    return Ask(spec=spec, model_name=spec.name, profile=profile, capacities=caps, workload=workload,
               drafts=tuple(draft_choices), top=top, model_path=local, command=command)
