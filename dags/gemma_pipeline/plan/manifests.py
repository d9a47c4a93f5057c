"""The checked-in `k8s/jobs/` kustomize tree for
`kubectl` users, generated from the same spec the DAG submits (`jobspec.job_manifest`).

- `base/<stage>/`: the stage's Job. Its image is a short name (`gemma-lora/<stage>`) that an overlay maps to
  a registry with kustomize's `images:`; its prefixes read `$(GEMMA_BUCKET)` and `$(GEMMA_RUN)`, which
  Kubernetes expands from the container's env, filled from the ConfigMap `gemma-pipeline-run`.
- `components/settings/`: the deployment's settings in one place (namespace, images, bucket and run).
- `overlays/example/<stage>/`: one overlay per stage (`kubectl apply -k k8s/jobs/overlays/example/preprocess`),
  since a stage may only start once the one before it has written its manifest. Each copies the image kustomize
  settled on into the container's `GEMMA_PIPELINE_IMAGE`, so an image pinned by digest in the settings is the code
  identity the stage records.
- `base/identities/`, `overlays/example/identities/`: the stages' Kubernetes service accounts, one per role, bound
  through Workload Identity (apply once per namespace; docs/security.md gives the Google side).
- `base/finetune-multihost/`: the fine-tune on a multi-host profile, a JobSet (one pod per host) built from the
  same Job (`jobspec.jobset_manifest`); `overlays/example/finetune-multihost/` applies it instead of `finetune`.
"""

from __future__ import annotations

from typing import Any

from gemma_pipeline.plan import GENERATED_HEADER, access, jobspec, profiles
from jobs.contract import stages
from jobs.contract.layout import RunLayout

HEADER = GENERATED_HEADER
RUN_CONFIGMAP = "gemma-pipeline-run"
# Env the kubectl Job has and the DAG's Job does not: the DAG renders the prefixes itself.
RUN_ENV = {"GEMMA_BUCKET": "bucket", "GEMMA_RUN": "run"}
MULTIHOST_PROFILE = "tpu-v5e-16"
JOBSET_CONFIG = "jobset-references.yaml"
EXAMPLE = {"namespace": "team-a", "queue": "team-a-queue", "bucket": "my-gemma-bucket", "run": "manual-001",
           "registry": "us-central1-docker.pkg.dev/my-project/gemma-lora", "tag": "0.1.0"}


def base_image(stage: str) -> str:
    return f"gemma-lora/{stage}"


def base_job(stage: str, profile_name: str = "") -> dict[str, Any]:
    """The stage's Job with the run's bucket and name left to the container env, namespace to the overlay."""
    profile = profiles.get(profile_name or stages.DEFAULT_PROFILES[stage])
    settings = jobspec.JobSettings(namespace="", queue=EXAMPLE["queue"], service_account=access.EXAMPLE.ksa(stage),
                                   image=base_image(stage), profile=profile, priority_class="development")
    layout = RunLayout.of("$(GEMMA_BUCKET)", "$(GEMMA_RUN)")  # the DAG's one-candidate layout
    job = jobspec.job_manifest(stage, settings, jobspec.stage_args(stage, {}, layout.stages()), name=f"gemma-{stage}")
    del job["metadata"]["namespace"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": name, "valueFrom": {"configMapKeyRef": {"name": RUN_CONFIGMAP, "key": key}}}
                        for name, key in RUN_ENV.items()] + container["env"]
    return job


def image_replacement(kind: str) -> dict[str, Any]:
    """kustomize's `images:` rewrites the image but not an env value: this copies the final image into the env the
    stage reads its code identity from (an overlay's replacements run after its components' `images:`)."""
    container = "spec.template.spec.containers.[name=stage]"
    path = container if kind == "Job" else f"spec.replicatedJobs.[name={jobspec.REPLICATED_JOB}].template.{container}"
    return {"source": {"kind": kind, "fieldPath": f"{path}.image"},
            "targets": [{"select": {"kind": kind}, "fieldPaths": [f"{path}.env.[name={jobspec.IMAGE_ENV}].value"]}]}


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=False, width=120)


def render_all() -> dict[str, str]:
    files = {}
    for index, stage in enumerate(stages.NAMES, start=1):
        files[f"base/{stage}/job.yaml"] = (
            HEADER + f"# Stage {index} of {len(stages.NAMES)}: {stage} (profile {stages.DEFAULT_PROFILES[stage]}).\n"
            + _yaml(base_job(stage)))
        files[f"base/{stage}/kustomization.yaml"] = HEADER + _yaml(
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["job.yaml"]})
        files[f"overlays/example/{stage}/kustomization.yaml"] = (
            HEADER + f"# kubectl apply -k k8s/jobs/overlays/example/{stage}   (after stage {index - 1} finished)\n"
            + _yaml({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [f"../../../base/{stage}"], "components": ["../../../components/settings"],
                     "nameSuffix": f"-{EXAMPLE['run']}", "replacements": [image_replacement("Job")]}))
    multihost = profiles.get(MULTIHOST_PROFILE)
    files["base/finetune-multihost/jobset.yaml"] = (
        HEADER + f"# Stage 2 of {len(stages.NAMES)} on a multi-host profile: finetune (profile {MULTIHOST_PROFILE}, "
        f"{multihost.hosts} hosts), a JobSet.\n" + _yaml(jobspec.jobset_manifest(base_job("finetune", MULTIHOST_PROFILE), multihost)))
    files["base/finetune-multihost/kustomization.yaml"] = HEADER + _yaml(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["jobset.yaml"]})
    files["overlays/example/finetune-multihost/kustomization.yaml"] = (
        HEADER + "# kubectl apply -k k8s/jobs/overlays/example/finetune-multihost   (after stage 1 finished; needs the "
        "JobSet controller)\n" + _yaml({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                        "resources": ["../../../base/finetune-multihost"],
                                        "components": ["../../../components/settings"], "nameSuffix": f"-{EXAMPLE['run']}",
                                        "replacements": [image_replacement("JobSet")]}))
    # kustomize knows where built-in kinds refer to a ConfigMap, not a JobSet: without this the generated
    # ConfigMap's hashed name would not reach the JobSet's pods.
    files[f"components/settings/{JOBSET_CONFIG}"] = HEADER + _yaml({"nameReference": [{"kind": "ConfigMap", "version": "v1", "fieldSpecs": [
        {"kind": "JobSet", "path": "spec/replicatedJobs/template/spec/template/spec/containers/env/valueFrom/configMapKeyRef/name"}]}]})
    settings = {
        "apiVersion": "kustomize.config.k8s.io/v1alpha1",
        "kind": "Component",
        "configurations": [JOBSET_CONFIG],
        "namespace": EXAMPLE["namespace"],
        "images": [{"name": base_image(stage), "newName": f"{EXAMPLE['registry']}/{stage}", "newTag": EXAMPLE["tag"]}
                   for stage in stages.NAMES],
        "configMapGenerator": [{"name": RUN_CONFIGMAP, "literals": [f"bucket={EXAMPLE['bucket']}",
                                                                    f"run={EXAMPLE['run']}"]}],
    }
    files["components/settings/kustomization.yaml"] = (
        HEADER + "# Your deployment: namespace, images (pin a tag or digest), bucket and run name. A copy of this\n"
        "# component with your values, named by your overlays, is all a kubectl user edits. To pin by digest, add\n"
        "# `digest: sha256:...` to an image entry: the stage then records that digest as its code identity.\n" + _yaml(settings))
    accounts = access.service_accounts(access.EXAMPLE, "", stages.NAMES)
    files["base/identities/serviceaccounts.yaml"] = HEADER + "".join(
        ("---\n" if i else "") + _yaml(a) for i, a in enumerate(accounts))
    files["base/identities/kustomization.yaml"] = HEADER + _yaml(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["serviceaccounts.yaml"]})
    files["overlays/example/identities/kustomization.yaml"] = (
        HEADER + "# kubectl apply -k k8s/jobs/overlays/example/identities   (once per namespace; set your project's Google\n"
        "# service accounts in the annotations: docs/security.md)\n" + _yaml(
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
             "resources": ["../../../base/identities"], "namespace": EXAMPLE["namespace"]}))
    return files
