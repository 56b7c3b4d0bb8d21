"""Audit: a run's lineage (base model, dataset, config and hyperparameters, git, seeds, hardware — the GPUs its
samples came from too — and environment, with their SHA-256), its checkpoints and output artifacts with hashes, its
quality gates (messages' long decimals rounded), registry stage and audit record, the whole as a JSON download
(auditors), and the registry actions (approvers). Each table spans the page, so hashes show whole."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from trainwire.dashboard.access import current, logged_download
from trainwire.dashboard.audit_data import audit_export, governance
from trainwire.dashboard.cells import rounded
from trainwire.dashboard.registry_actions import show_registry_actions
from trainwire.dashboard.shared import client, live, reader, require_run

REFRESH_SECONDS = 5.0  # lineage is written once; gates and the registry change at run end and on review
NOT_EVALUATED = "not evaluated yet"
LINEAGE = {
    "Base model": [("name", "base_model"), ("source", "base_model_source"), ("revision", "base_model_revision"),
                   ("sha256", "base_model_sha256"), ("adapter config", "adapter_json")],
    "Dataset": [("path", "dataset_path"), ("version", "dataset_version"), ("sha256", "dataset_sha256"),
                ("samples", "dataset_samples"), ("format", "dataset_format"), ("source", "dataset_source"),
                ("licence", "dataset_license"), ("preprocessing", "dataset_preprocessing")],
    "Config and code": [("config file", "config_file"), ("config sha256", "config_sha256"),
                        ("git commit", "git_commit"), ("git dirty", "git_dirty")],
    "Seeds and determinism": [("seed", "seed"), ("data seed", "data_seed"), ("numpy seed", "numpy_seed"),
                              ("cudnn deterministic", "cudnn_deterministic"), ("cudnn benchmark", "cudnn_benchmark"),
                              ("deterministic algorithms", "deterministic_algorithms")],
    "Hardware": [("GPU type", "gpu_type"), ("GPU count", "gpu_count"), ("driver", "gpu_driver_version"),
                 ("CUDA", "cuda_version"), ("world size", "world_size")],
    "Environment": [("container image digest", "container_image_digest"), ("packages sha256", "packages_sha256")],
}


def files_table(rows: list[dict], **extra: Any) -> pd.DataFrame:
    return pd.DataFrame([{**extra, "file": f["name"], "size": f["size"], "sha256": f["sha256"]} for f in rows])


def gpu_text(gpu: dict) -> str:
    memory = f" · {gpu['memory_total_mb'] / 1024:.0f} GB" if gpu.get("memory_total_mb") else ""
    return f"{gpu['gpu_name'] or 'unnamed GPU'}{memory} · {gpu['gpu_uuid'] or 'no UUID'} (seen in its GPU samples)"


def lineage_sections(started: dict, gpus: list[dict]) -> dict[str, tuple[list[tuple[str, str]], list[str]]]:
    """Per section, the (field, value) pairs recorded and the names of the fields not recorded. Hardware adds the
    GPUs the run's samples came from, config its hyperparameters: what it ran on and with, shown as recorded."""
    sections = {}
    for title, fields in LINEAGE.items():
        sections[title] = ([(name, _shown(started.get(key))) for name, key in fields if _recorded(started.get(key))],
                           [name for name, key in fields if not _recorded(started.get(key))])
    sections["Environment"][0].extend(sorted((name, str(value))
                                             for name, value in (started.get("environment") or {}).items()))
    sections["Hardware"][0].extend((f"GPU {gpu['gpu_index']} on {gpu['host']}", gpu_text(gpu)) for gpu in gpus)
    try:
        parameters = json.loads(started.get("hyperparameters_json") or "{}")
    except ValueError:
        parameters = {}
    sections["Config and code"][0].extend(
        (f"hyperparameter {name}", value if isinstance(value, str) else json.dumps(value))
        for name, value in sorted(parameters.items()))
    return sections


def show_lineage(started: dict, gpus: list[dict]) -> None:
    """One section under another, each the page's width: a SHA-256 (71 characters) shows whole at 1600 px."""
    for title, (recorded, missing) in lineage_sections(started, gpus).items():
        st.markdown(f"**{title}**")
        if recorded:
            st.dataframe(pd.DataFrame(recorded, columns=["field", "value"]), hide_index=True, width="stretch",
                         column_config={"field": st.column_config.TextColumn(width=240)})
        if missing:
            st.caption(f"not recorded: {', '.join(missing)}")


def _recorded(value: Any) -> bool:
    return value is not None and value != [] and value != ""


def _shown(value: Any) -> str:
    if not _recorded(value):
        return "—"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def show_outputs(checkpoints: list[dict], ended: dict | None) -> None:
    st.subheader("Checkpoints")
    if checkpoints:
        st.dataframe(pd.concat([files_table(c["files"], step=c["step"], path=c["path"], eval_loss=c["eval_loss"],
                                            best=c["is_best"]) for c in checkpoints if c["files"]]
                               or [pd.DataFrame()], ignore_index=True), hide_index=True, width="stretch")
    else:
        st.caption("no checkpoints recorded")
    st.subheader("Output artifacts")
    if ended is None:
        st.caption("the run has not ended")
    elif ended["artifacts"]:
        st.caption(f"run {ended['status']}" + (f": {ended['error']}" if ended.get("error") else ""))
        st.dataframe(files_table(ended["artifacts"]), hide_index=True, width="stretch")
    else:
        st.caption(f"run {ended['status']}; no artifacts recorded")


def show_governance(record: dict[str, Any]) -> None:
    st.subheader("Quality gates")
    gates = record["gates"]
    if gates is None:
        st.caption(f"Quality gates: {NOT_EVALUATED}")
    else:
        st.markdown(f"**{gates['overall']}** · evaluated {gates['evaluated_at']:%Y-%m-%d %H:%M:%S} UTC "
                    f"({gates['trigger']}, by {gates['actor']}) · result {gates['result_sha256']}")
        verdicts = pd.DataFrame(gates["gates"])[["gate", "name", "status", "on_fail", "message"]]
        st.table(verdicts.assign(message=verdicts["message"].map(rounded)).set_index("gate"))
    st.subheader("Registry stage")
    history = record["registry"]
    if history is None:
        why = NOT_EVALUATED if gates is None else f"no transitions; gates {gates['overall']}"
        st.caption(f"Registry stage: None ({why})")
    else:
        st.markdown(f"**{history[-1]['to_stage']}** since {history[-1]['ts']:%Y-%m-%d %H:%M:%S} UTC")
        st.dataframe(pd.DataFrame(history)[["ts", "from_stage", "to_stage", "actor", "reason"]], hide_index=True,
                     width="stretch")
    for entry in record.get("unvouched") or []:
        st.error(f"Audit log entry {entry['seq']} claims {entry['from_stage']} → {entry['to_stage']} by "
                 f"{entry['actor']}, but is {entry['problem']}: it sets no stage. Run `trainwire audit verify`.",
                 icon=":material/gpp_bad:")
    st.subheader("Audit record")
    if record["audit_record"] is None:
        st.caption(f"Audit record: {NOT_EVALUATED}")
    else:
        with st.expander("as stored with the latest gate evaluation"):
            st.json(record["audit_record"])


def body(run_id: str) -> None:
    store = reader()
    started = store.run_started(run_id)
    if started is None:
        st.info("This run has no run-started event stored yet.")
        return
    checkpoints, ended, record = store.checkpoints(run_id), store.run_ended(run_id), governance(store, run_id)
    st.caption(f"{started['experiment']} · {started['run_name']} · {run_id} · started "
               f"{started['ts']:%Y-%m-%d %H:%M:%S} UTC by {started['user'] or 'unknown user'}")
    if (access := current()) is not None and access.may("auditor"):
        st.download_button("Download audit JSON",
                           logged_download(client(), run_id,
                                           lambda: json.dumps(audit_export(store, run_id), indent=2)),
                           file_name=f"audit-{run_id}.json", mime="application/json", key="audit-download",
                           icon=":material/download:", on_click="ignore")
    st.subheader("Lineage")
    show_lineage(started, store.gpus_seen(run_id))
    show_outputs(checkpoints, ended)
    show_governance(record)


def registry_stage(run_id: str) -> str:
    history = governance(reader(), run_id)["registry"]
    return history[-1]["to_stage"] if history else "None"


st.title("Audit")
if (chosen := require_run()) is not None:
    show_registry_actions(chosen, registry_stage(chosen))
    live(lambda: body(chosen), every=REFRESH_SECONDS)
