"""The `serve` task: hand the champion to Vertex AI or to a vLLM Deployment on GKE (see `gemma_pipeline.plan.serving`
for the requests it sends). Skipped when `serve` is `none`, and on the local backend, which has neither (the
champion's answers before and after fine-tuning are in its convert output and the run report)."""

from __future__ import annotations

import os
from typing import Any

from airflow.providers.google.cloud.operators.kubernetes_engine import GKEOperatorMixin
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from gemma_pipeline import local
from gemma_pipeline.plan import access, jobspec, serving
from gemma_pipeline.storage.store import RunStore
from jobs.contract import artifacts, documents
from jobs.contract.layout import RunLayout


class ServeOperator(GKEOperatorMixin, BaseOperator):
    template_fields = ("run_prefix", "mode")

    def __init__(self, *, mode: str, run_prefix: str = "", project_id: str, location: str, cluster_name: str,
                 gcp_conn_id: str = "google_cloud_default", timeout_s: int = 1800,
                 service_account: str = access.EXAMPLE.ksa(access.SERVING),
                 **kwargs: Any) -> None:
        for key in ("namespace", "service_account_name", "wait_until_job_complete", "deferrable", "parallelism",
                    "completions", "suspend", "backoff_limit", "ttl_seconds_after_finished", "get_logs",
                    "queue_timeout_s"):
            kwargs.pop(key, None)  # the stage Jobs' default_args, which this task does not take
        super().__init__(**kwargs)
        self.run_prefix, self.mode, self.timeout_s, self.service_account = run_prefix, mode, timeout_s, service_account
        self.project_id, self.location, self.cluster_name, self.gcp_conn_id = project_id, location, cluster_name, gcp_conn_id
        self.impersonation_chain = None
        self.use_internal_ip = self.use_dns_endpoint = False
        self.enable_tcp_keepalive = True

    def execute(self, context: Any) -> dict[str, Any]:
        if self.mode not in serving.MODES:
            raise AirflowFailException(f"serve: got {self.mode!r}; expected one of {', '.join(serving.MODES)}")
        if self.mode == "none":
            raise AirflowSkipException("serve is none: the champion stays in the bucket")
        if local.backend() == "local":
            raise AirflowSkipException(f"serve={self.mode} needs Google Cloud; the local backend has no Vertex AI or GKE")
        layout = RunLayout(self.run_prefix) if self.run_prefix else jobspec.run_layout(context["params"], context["run_id"])
        self.run_prefix = layout.prefix
        data = RunStore("gke", self.gcp_conn_id).read(layout.champion)
        if not data:
            raise AirflowFailException(f"no {layout.champion}: nothing to serve")
        record = documents.CHAMPION.load(data, layout.champion)
        if (record.get("approval") or {}).get("candidate") is None and record.get("approval"):
            raise AirflowSkipException("the run was rejected at approval: nothing to serve")
        store = RunStore("gke", self.gcp_conn_id)
        return self.to_vertex(context, record) if self.mode == "vertex" else self.to_gke(record, self.adapter_ranks(store, record))

    @staticmethod
    def converted(record: dict[str, Any]) -> list[dict[str, Any]]:
        """The candidates this run converted (the approve task records them), the approved one among them."""
        keys = record.get("converted") or [record["champion"]]
        return [r for r in record["candidates"] if r["key"] in keys]

    def adapter_ranks(self, store: Any, record: dict[str, Any]) -> dict[str, int]:
        """Each converted candidate's PEFT adapter rank (`r` in its adapter_config.json), by key; none without one."""
        ranks = {}
        for row in self.converted(record):
            uri = f"{row['prefixes']['convert']}/{artifacts.PEFT_ADAPTER}/{artifacts.PEFT_ADAPTER_CONFIG}"
            config = store.read_json(uri)
            if config is None:
                continue
            if not isinstance(config.get("r"), int) or config["r"] < 1:
                raise AirflowFailException(f"{uri}: r is {config.get('r')!r}; expected the adapter's LoRA rank, a positive integer")
            ranks[row["key"]] = config["r"]
        return ranks

    def to_vertex(self, context: Any, record: dict[str, Any]) -> dict[str, Any]:
        """Every converted candidate a version of one Model Registry model (`GEMMA_PIPELINE_VERTEX_MODEL`, or the
        model the first upload creates); the approved one is made its default version and deployed to the endpoint.
        A retry (the task's, or a cleared run's) reuses the versions its run uploaded and a deployment already made."""
        from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook
        from airflow.providers.google.cloud.operators.vertex_ai.model_service import (
            SetDefaultVersionOnModelOperator,
            UploadModelOperator,
        )

        image = os.environ.get(serving.VERTEX_VLLM_IMAGE_ENV)
        if not image:
            raise AirflowFailException(f"serve=vertex: set {serving.VERTEX_VLLM_IMAGE_ENV} to a vLLM serving image for "
                                       "Vertex AI (Model Garden's vLLM build, mirrored into your Artifact Registry)")
        run = self.run_prefix.rstrip("/").rsplit("/", 1)[-1]
        where = {"project_id": self.project_id, "region": self.location}
        models = ModelServiceHook(gcp_conn_id=self.gcp_conn_id)
        try:
            parent = serving.model_id(os.environ[serving.VERTEX_MODEL_ENV], self.project_id, self.location) \
                if os.environ.get(serving.VERTEX_MODEL_ENV) else None
        except ValueError as err:
            raise AirflowFailException(str(err)) from err
        if parent is None:  # the model an earlier try of this run created, if any
            created = next(iter(models.list_models(**where, filter=serving.run_filter(run))), None)
            parent = created.name.rsplit("/", 1)[-1] if created else None
        done = serving.registered(models.list_model_versions(**where, model_id=parent)) if parent else {}
        versions: dict[str, dict[str, Any]] = {}
        for row in sorted(self.converted(record), key=lambda r: r["key"] == record["champion"]):  # the approved last
            export = row["prefixes"]["convert"]
            if export in done:
                versions[row["key"]] = {k: done[export][k] for k in ("model", "model_version_id")}
                self.log.info("candidate %s: already registered as %s", row["key"], versions[row["key"]])
                continue
            model = serving.vertex_model(f"gemma-lora-{run}", export, image,
                                         serving.vertex_labels(run, row["key"], row["key"] == record["champion"]))
            response = UploadModelOperator(task_id=f"{self.task_id}_upload", **where, model=model, parent_model=parent,
                                           gcp_conn_id=self.gcp_conn_id).execute(context)
            parent = parent or response["model"].rsplit("/", 1)[-1]
            versions[row["key"]] = {"model": response["model"], "model_version_id": response.get("model_version_id")}
        approved = versions[record["champion"]]
        champion_export = next(r for r in record["candidates"] if r["key"] == record["champion"])["prefixes"]["convert"]
        for export, found in done.items():  # the decision changed since they were uploaded: their labels follow it
            if export.startswith(f"{self.run_prefix.rstrip('/')}/") and \
                    (update := serving.relabelled(found, export == champion_export)):
                models.get_model_service_client(self.location).update_model(request=update)
        SetDefaultVersionOnModelOperator(task_id=f"{self.task_id}_default", **where,
                                         model_id=serving.model_version(approved["model"], approved["model_version_id"], full=False),
                                         gcp_conn_id=self.gcp_conn_id).execute(context)
        result = {"mode": "vertex", **approved, "versions": versions}
        if endpoint := os.environ.get(serving.VERTEX_ENDPOINT_ENV):
            self.deploy(context, where, endpoint, approved, f"gemma-lora-{run}-{record['champion']}")
            result["endpoint"] = endpoint
        self.log.info("candidates registered in Vertex AI as versions of %s; the approved %s is the default: %s",
                      approved["model"], record["champion"], result)
        return result

    def deploy(self, context: Any, where: dict[str, str], endpoint: str, approved: dict[str, Any], name: str) -> None:
        """The approved version on the endpoint with all its traffic: deployed once (under an id fixed by the version,
        so a repeated deploy is refused), or given the traffic back when it is there already."""
        from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook
        from airflow.providers.google.cloud.operators.vertex_ai.endpoint_service import DeployModelOperator

        hook = EndpointServiceHook(gcp_conn_id=self.gcp_conn_id)
        version = serving.model_version(approved["model"], approved["model_version_id"])
        current = hook.get_endpoint(**where, endpoint=endpoint)
        deployed_id = serving.deployed_on(current, approved["model"], approved["model_version_id"])
        if deployed_id is None:
            deployed = {**serving.vertex_deployed_model(name, deployed_id=serving.deployed_model_id(
                approved["model"], approved["model_version_id"])), "model": version}
            DeployModelOperator(task_id=f"{self.task_id}_deploy", **where, endpoint_id=endpoint, deployed_model=deployed,
                                traffic_split={"0": 100}, gcp_conn_id=self.gcp_conn_id).execute(context)
        elif current.traffic_split.get(deployed_id) != 100:
            self.log.info("endpoint %s serves %s already; giving it all the traffic", endpoint, version)
            hook.update_endpoint(**where, endpoint_id=endpoint, endpoint={"traffic_split": {deployed_id: 100}},
                                 update_mask={"paths": ["traffic_split"]})
        else:
            self.log.info("endpoint %s serves %s already, with all the traffic", endpoint, version)

    def to_gke(self, record: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
        from kubernetes import client

        try:
            plan = serving.served(record, ranks)
        except ValueError as err:
            raise AirflowFailException(str(err)) from err
        objects = serving.gke_objects(plan["mounts"], plan["args"], service_account=self.service_account)
        api = self.hook.get_conn()
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        name, namespace = objects[0]["metadata"]["name"], objects[0]["metadata"]["namespace"]
        try:
            serving.check_api_key(core, namespace)
        except ValueError as err:
            raise AirflowFailException(str(err)) from err
        serving.apply(apps, core, client.NetworkingV1Api(api), objects)
        status = serving.wait_available(apps, name, namespace, self.timeout_s, log=self.log.info)
        self.log.info("vLLM serves %s (the approved %s as %s): Service %s/%s port 80", ", ".join(plan["models"]),
                      record["champion"], serving.APPROVED_NAME, namespace, name)
        return {"mode": "gke", "deployment": f"{namespace}/{name}", "models": plan["models"],
                "available_replicas": status.get("available_replicas")}
