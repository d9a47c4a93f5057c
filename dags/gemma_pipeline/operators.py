"""`StageJobOperator`: `GKEStartJobOperator` for one pipeline stage, with three additions the provider lacks:

- the accelerator profile is a run-time param, so node selectors, tolerations, resources and the fine-tune's
  distribution flags are applied when the Job is built;
- it waits for Kueue to admit the suspended Job before looking for pods (with a queue timeout that reports
  the Workload's conditions), instead of failing with "No pods running with labels";
- a Job failed by its podFailurePolicy (exit code 2, 3 or 4: bad input, quality gate, broken export) fails
  the task without retries; other failures keep Airflow's retries.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartJobOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from gemma_pipeline import jobspec, profiles
from gemma_pipeline.kueue_wait import QueueTimeout, wait_for_admission, wait_for_pods

NON_RETRIABLE_REASON = "PodFailurePolicy"
POD_START_TIMEOUT_S = 600


@functools.cache
def _api_client() -> Any:
    from kubernetes.client import ApiClient

    return ApiClient()


def _k8s(kind: str, value: Any) -> Any:
    """A plain dict as the kubernetes client's model object (the provider merges model objects)."""

    class _Response:
        data = json.dumps(value)

    return _api_client().deserialize(_Response(), kind)


class StageJobOperator(GKEStartJobOperator):
    template_fields = (*GKEStartJobOperator.template_fields, "queue_timeout_s", "progress_uri", "profile_name")

    def __init__(self, *, stage: str, profile_name: str, queue_timeout_s: str | int = 3600, progress_uri: str = "",
                 **kwargs: Any) -> None:
        # The pipeline's pod policy, shared with k8s/jobs: non-root, read-only root filesystem, /tmp scratch.
        kwargs.setdefault("base_container_name", jobspec.CONTAINER)
        kwargs.setdefault("security_context", _k8s("V1PodSecurityContext", jobspec.POD_SECURITY))
        kwargs.setdefault("container_security_context", _k8s("V1SecurityContext", jobspec.CONTAINER_SECURITY))
        kwargs.setdefault("volumes", [_k8s("V1Volume", v) for v in jobspec.VOLUMES])
        kwargs.setdefault("volume_mounts", [_k8s("V1VolumeMount", v) for v in jobspec.VOLUME_MOUNTS])
        kwargs.setdefault("env_vars", dict(jobspec.SCRATCH_ENV))
        super().__init__(**kwargs)
        self.stage = stage
        self.profile_name = profile_name
        self.queue_timeout_s = queue_timeout_s
        self.progress_uri = progress_uri

    def build_job_request_obj(self, context: Any = None) -> k8s.V1Job:
        profile = profiles.get(str(self.profile_name))
        self.node_selector = dict(profile.node_selector)
        self.tolerations = [k8s.V1Toleration(**t) for t in profile.tolerations]
        self.container_resources = k8s.V1ResourceRequirements(**jobspec.resources(profile))
        if self.stage == "finetune" and "--distribution" not in self.arguments:
            self.arguments = [*self.arguments, *profile.distribution_args]
        job = super().build_job_request_obj(context)
        job.spec.pod_failure_policy = _k8s("V1PodFailurePolicy", jobspec.pod_failure_policy())
        job.spec.template.spec.restart_policy = "Never"
        return job

    def get_pods(self, pod_request_obj: k8s.V1Pod, context: Any, *, exclude_checked: bool = True) -> list[k8s.V1Pod]:
        name, namespace = self.job.metadata.name, self.job.metadata.namespace
        try:
            wait_for_admission(self.hook.batch_v1_client, self.hook.custom_object_client, name, namespace,
                               timeout_s=float(self.queue_timeout_s), log=self.log.info)
        except QueueTimeout as err:
            self.log.error("%s", err)
            self.hook.batch_v1_client.delete_namespaced_job(name=name, namespace=namespace, propagation_policy="Foreground")
            raise AirflowFailException(str(err)) from err
        selector = self._build_find_pod_label_selector(context, exclude_checked=exclude_checked)
        pods = wait_for_pods(self.client, namespace, selector, POD_START_TIMEOUT_S)
        if not pods:
            raise AirflowException(f"Job {namespace}/{name} was admitted but no pod with labels {selector} appeared within {POD_START_TIMEOUT_S} s")
        for pod in pods:
            self.log_matching_pod(pod=pod, context=context)
        return pods

    def execute_deferrable(self) -> None:
        from gemma_pipeline.triggers import ProgressGKEJobTrigger

        self.defer(
            trigger=ProgressGKEJobTrigger(
                cluster_url=self.cluster_url, ssl_ca_cert=self.ssl_ca_cert, job_name=self.job.metadata.name,
                job_namespace=self.job.metadata.namespace, pod_names=[p.metadata.name for p in self.pods],
                pod_namespace=self.pods[0].metadata.namespace, base_container_name=self.base_container_name,
                gcp_conn_id=self.gcp_conn_id, poll_interval=self.job_poll_interval,
                impersonation_chain=self.impersonation_chain, get_logs=self.get_logs, do_xcom_push=self.do_xcom_push,
                use_dns_endpoint=self.use_dns_endpoint, progress_uri=self.progress_uri,
            ),
            method_name="execute_complete",
        )

    def execute(self, context: Any) -> Any:
        with non_retriable_failures():
            return super().execute(context)

    def execute_complete(self, context: Any, event: dict, **kwargs: Any) -> Any:
        if event.get("status") == "error" and self.get_logs:
            self._show_failed_pod_logs(event)  # the provider raises before fetching logs; the reason is in them
        with non_retriable_failures():
            return super().execute_complete(context, event, **kwargs)

    def _show_failed_pod_logs(self, event: dict) -> None:
        namespace = event.get("pod_namespace") or event.get("namespace")
        for name in event.get("pod_names") or []:
            try:
                self._write_logs(self.hook.get_pod(name, namespace))
            except Exception as err:  # logs are a courtesy; the failure below is what matters
                self.log.warning("could not fetch logs of pod %s: %s", name, err)


class non_retriable_failures:
    """Turn 'job failed with error PodFailurePolicy' into a failure Airflow does not retry."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        if isinstance(error, AirflowException) and not isinstance(error, AirflowFailException) and NON_RETRIABLE_REASON in str(error):
            raise AirflowFailException(
                f"{error} (the stage exited with a non-retriable code: 2 bad input, 3 quality gate, 4 export mismatch; "
                "see the pod log)"
            ) from error
        return False
