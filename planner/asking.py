"""The planner's ``Ask`` from what a user typed: a model name or folder, budgets in GiB (2^30 bytes), a profile,
drafts, acceptance or a calibration file, and the workload (``specplan search`` and ``specplan validate``)."""

from __future__ import annotations

from specplan.catalog import bundled_profiles, load_model_spec, load_profile, model_weights
from specplan.contracts.calibration import Calibration
from specplan.contracts.plan import Capacities, Headroom, Sampling, Workload
from specplan.errors import SpecplanError
from specplan.fmt import GiB
from specplan.jsonio import load
from specplan.planner.ask import Ask
from specplan.planner.dtypes import candidate_dtypes
from specplan.planner.drafts import choices


def capacities(profile, vram: float, ram: float | None, disk: float | None) -> Capacities:
    """The budgets in bytes from GiB, checked against the profile's memories; the host budget defaults to the host's
    memory less the headroom for the OS and the engine process (``Headroom``), which is recorded in the plan."""
    head = Headroom.of(profile)
    mem = profile.host.memory_bytes
    disk_bytes = int(disk * GiB) if disk else None
    if not profile.has_host_tier:
        if vram * GiB + head.total_bytes > mem:
            raise SpecplanError(
                f"--vram {vram:g} GiB plus the {head.total_bytes / GiB:.1f} GiB headroom for the OS and the engine "
                f"process exceeds this machine's memory ({mem / GiB:.1f} GiB, shared by device and host here): pass "
                f"--vram {max(mem - head.total_bytes, 0) / GiB:.1f} or less, or plan for a GPU box with a bundled "
                f"profile, e.g. --profile rtx4090-pcie4 ({gpu_profiles_hint()})")
        return Capacities(device_bytes=int(vram * GiB), disk_bytes=disk_bytes, headroom=head)
    dev = profile.device.memory_bytes
    if vram * GiB > dev:
        raise SpecplanError(f"--vram {vram:g} GiB exceeds the device's memory ({dev / GiB:.1f} GiB, "
                            f"{profile.device.name} of profile {profile.name}): pass --vram {dev / GiB:g} or less")
    if ram is not None and ram * GiB > mem:
        raise SpecplanError(f"--ram {ram:g} GiB exceeds the host's memory ({mem / GiB:.1f} GiB in profile "
                            f"{profile.name}): pass --ram {(mem - head.total_bytes) / GiB:.1f} or less (the default "
                            f"leaves {head.total_bytes / GiB:.2f} GiB to the OS and the engine process)")
    host = int(ram * GiB) if ram is not None else mem - head.total_bytes
    return Capacities(device_bytes=int(vram * GiB), host_bytes=host, disk_bytes=disk_bytes, headroom=head)


def gpu_profiles_hint() -> str:
    """The bundled profiles by name, and how to see one."""
    return f"bundled: {', '.join(bundled_profiles())}; `specplan profile --show NAME` prints one"


def make_ask(model: str, vram: float, ram: float | None, disk: float | None, profile_arg: str | None,
             drafts: tuple[str, ...], acceptance: float | None, calibration: str | None, prompt_len: int,
             gen_len: int, num_prompts: int, top: int, command: str | None = None,
             sampling: Sampling = Sampling(), dtype: str | None = None) -> Ask:
    """``vram``, ``ram`` and ``disk`` in GiB (``ram`` None: the profile's host memory; ``disk`` None: unlimited);
    ``drafts`` empty: every draft that fits the model; ``command``: the invocation recorded in the plans."""
    spec = load_model_spec(model)
    profile = load_profile(profile_arg)
    local = model_weights(model)
    caps = capacities(profile, vram, ram, disk)
    calib = load(Calibration, calibration) if calibration else None
    draft_choices = choices(list(drafts) or None, spec, spec.name, acceptance, calib, sampling, profile)
    workload = Workload(prompt_len=prompt_len, gen_len=gen_len, num_prompts=num_prompts, sampling=sampling)
    return Ask(spec=spec, model_name=spec.name, profile=profile, capacities=caps, workload=workload,
               drafts=tuple(draft_choices), top=top, model_path=local, command=command,
               dtypes=candidate_dtypes(profile, spec, dtype))
