"""Hold a recommendation to the target release's own code.

A recommendation (``recommendation.json``, or the same built in memory at the end of a run)
says, per quantized component, which layers it means to run in FP8 and which in BF16 (its
``layers``), and gives the config forms to paste.  ``check_recommendation`` builds the target's
own pipeline for the same model with each of those forms (``vllm_omni_probe.py``, run by the
Python of an environment where the target release is installed) and compares, layer by layer:

* a form that fails to load;
* an ``ignored_layers`` entry that matches no layer (a silent no-op under exact matching);
* a layer meant to stay in BF16 that the target quantizes, or meant for FP8 that it keeps;
* a layer the target quantizes that the recommendation does not know (other than the target's
  declared unused layers), or a named layer the target does not build.

Each problem is one line.  Finding the release's Python: ``--python``, else
``$LAYERSCAN_VLLM_OMNI_PYTHON``, else this interpreter when it can import ``vllm_omni``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from layerscan.errors import UserError
from layerscan.profiles import Target, resolve_target

PROBE = Path(__file__).with_name("vllm_omni_probe.py")
PYTHON_ENV = "LAYERSCAN_VLLM_OMNI_PYTHON"
UNQUANTIZED = "UnquantizedLinearMethod"
FORM_KEYS = {"flat": "quantization_config_flat", "per_component": "quantization_config_per_component"}


@dataclass
class CheckResult:
    """What the target's code said about a recommendation; ``problems`` empty means it agrees."""

    target: str
    version: str  # the installed release that was asked
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Per form and component: how many layers the target quantizes and keeps in BF16.
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"target": self.target, "checked_with": self.version, "ok": self.ok,
                "problems": self.problems, "notes": self.notes, "counts": self.counts}


def find_python(explicit: str | None = None) -> str | None:
    """The Python of an environment with vLLM-Omni installed, or None."""
    chosen = explicit or os.environ.get(PYTHON_ENV)
    if chosen:
        if not Path(chosen).exists():
            raise UserError(f"no Python at {chosen} (given for vLLM-Omni's environment)")
        return chosen
    return sys.executable if importlib.util.find_spec("vllm_omni") is not None else None


def installed_versions(python: str) -> dict[str, str | None]:
    """vllm-omni's and vllm's installed versions in ``python``'s environment (no import of either)."""
    code = ("import importlib.metadata as m, json\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({'vllm-omni': v('vllm-omni'), 'vllm': v('vllm')}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"{python} could not report its packages: "
                        f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout)


def require_release(python: str, target: Target) -> str:
    """The installed vllm-omni version, which must be the target's; one line otherwise."""
    if target.package is None:
        raise UserError(f"target {target.name} is not a release: there is no code to check against")
    version = installed_versions(python).get(target.package)
    if version is None:
        raise UserError(f"{target.package} is not installed for {python}; install "
                        f"'{target.package}=={target.version}' there (README: Checking against vLLM-Omni)")
    if version != target.version:
        raise UserError(f"the installed {target.package} is {version}, but the recommendation is "
                        f"for {target.name}; check with that release or rerun with --target "
                        f"{target.package}=={version} if layerscan knows it")
    return version


def probe(python: str, model_dir: Path, configs: dict[str, object], timeout_s: float = 900) -> dict:
    """Run the probe: for each named config, the target's per-layer decisions or its load error."""
    request = json.dumps({"model_dir": str(model_dir), "configs": configs})
    try:
        done = subprocess.run([python, str(PROBE)], input=request, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UserError(f"vLLM-Omni's pipeline did not build within {timeout_s:.0f} s") from None
    if done.returncode != 0 or not done.stdout.strip():
        last = [l for l in done.stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
        raise UserError(f"vLLM-Omni could not be asked (exit {done.returncode}): {last[0]}")
    return json.loads(done.stdout)


def compare(intent: dict[str, dict[str, list[str]]], answer: dict, form: str, target: Target,
            architecture: str) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """Problems, notes and counts for one form's answer against the intended FP8/BF16 layers."""
    problems: list[str] = []
    notes: list[str] = []
    if answer.get("error"):
        return [f"{form} form fails to load in {target.name}: {answer['error']}"], notes, {}
    unused = {(component, name): reason for arch, component, name, reason in target.unused_layers
              if arch == architecture}
    built: dict[str, dict[str, str]] = {}
    for layer in answer["layers"]:
        if layer["prefix"]:  # layers built without a prefix are built without the quant config
            built.setdefault(layer["component"], {})[layer["prefix"]] = layer["method"]
    for entry in answer.get("unmatched", []):
        problems.append(f"{form}: ignored_layers entry {entry!r} matches no layer (a silent no-op)")
    counts: dict[str, dict[str, int]] = {}
    for component in sorted(set(intent) | set(built)):
        layers = built.get(component, {})
        quantized = {name for name, method in layers.items() if method != UNQUANTIZED}
        meant = intent.get(component, {"fp8": [], "bf16": []})
        counts[component] = {"fp8": len(quantized), "bf16": len(layers) - len(quantized)}
        for name in meant["bf16"]:
            if name not in layers:
                problems.append(f"{form}: {component} has no layer {name!r} in {target.name}")
            elif name in quantized:
                problems.append(f"{form}: {component}.{name} is meant to stay in BF16 but "
                                f"{target.name} quantizes it")
        for name in meant["fp8"]:
            if name not in layers:
                problems.append(f"{form}: {component} has no layer {name!r} in {target.name}")
            elif name not in quantized:
                problems.append(f"{form}: {component}.{name} is meant to run in FP8 but "
                                f"{target.name} keeps it in BF16")
        known = set(meant["fp8"]) | set(meant["bf16"])
        for name in sorted(quantized - known):
            if (component, name) in unused:
                notes.append(f"{component}.{name} runs in FP8 in {target.name} but is not a search "
                             f"dimension: {unused[(component, name)]}")
            else:
                problems.append(f"{form}: {target.name} quantizes {component}.{name}, which the "
                                "recommendation does not know")
    return problems, notes, counts


def check_recommendation(data: dict, model_dir: Path, python: str | None = None) -> CheckResult:
    """Check every config form ``data`` (a recommendation) offers against the installed target."""
    target = resolve_target(data.get("target"))
    if target.package is None:
        raise UserError(f"target {target.name} is not a release: there is no code to check against")
    if data.get("quantization_config") is None:
        raise UserError("the recommendation has no quantization_config to check (nothing passed)")
    if "layers" not in data:
        raise UserError("the recommendation does not say which layers it means to keep "
                        "(written by an older layerscan); rerun layerscan run to rewrite it")
    python = find_python(python)
    if python is None:
        raise UserError(f"vllm-omni is not installed here; point ${PYTHON_ENV} or --python at "
                        f"the Python of an environment with '{target.package}=={target.version}' "
                        "(README: Checking against vLLM-Omni)")
    version = require_release(python, target)
    configs = {form: data[key] for form, key in FORM_KEYS.items() if data.get(key) is not None}
    if data["quantization_config"] not in configs.values():
        configs["paste"] = data["quantization_config"]
    answers = probe(python, model_dir, configs)["results"]
    result = CheckResult(target.name, f"{target.package} {version}")
    architecture = data.get("architecture", "")
    for form, answer in answers.items():
        problems, notes, counts = compare(data["layers"], answer, form, target, architecture)
        result.problems += [p for p in problems if p not in result.problems]
        result.notes += [n for n in notes if n not in result.notes]
        if counts:
            result.counts[form] = counts
    return result


def check_after_run(data: dict, model_dir: Path) -> dict:
    """The check that ends ``layerscan run``: its result, or why it did not run.  Never raises
    for a missing or different release: the run's answer stands, the report says what happened."""
    target = resolve_target(data.get("target"))
    if target.package is None:
        return {"status": "not checked", "line": f"Not checked: `{target.name}` is a design, not a release."}
    if data.get("quantization_config") is None:
        return {"status": "not checked", "line": "Not checked: there is no configuration to paste."}
    try:
        python = find_python()
        if python is None:
            return {"status": "not checked",
                    "line": f"Not checked against {target.package}'s code: it is not installed here "
                            f"(`layerscan check` runs the check where it is; see the README)."}
        result = check_recommendation(data, model_dir, python)
    except UserError as exc:
        return {"status": "not checked", "line": f"Not checked against {target.package}'s code: {exc}."}
    if result.ok:
        line = (f"Checked against {result.version}'s own code: every form loads and keeps exactly "
                "the intended layers in BF16.")
    else:
        line = (f"Checked against {result.version}'s own code: **it disagrees** "
                f"({len(result.problems)} problems): " + "; ".join(result.problems[:5]))
    return {"status": "agrees" if result.ok else "disagrees", "line": line, **result.to_dict()}
