"""`StageJobOperator`: `GKEStartJobOperator` for one pipeline stage, with three additions the provider lacks:

- the accelerator profile is a run-time param, so node selectors, tolerations, resources and the fine-tune's
  distribution flags are applied when the Job is built;
- it waits for Kueue to admit the suspended Job before looking for pods (with a queue timeout that reports
  the Workload's conditions), instead of failing with "No pods running with labels";
- a Job failed by its podFailurePolicy (exit code 2, 3 or 4: bad input, quality gate, broken export) fails
  the task without retries; other failures keep Airflow's retries;
- with the `local` backend (`gemma_pipeline.local`) the same Job runs as a local subprocess.

Either way the task pushes `usage` to XCom (backend, profile, seconds the stage held its hardware) for the run
report's cost table.
"""

from __future__ import annotations

import functools
import json
import re
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from airflow.providers.google.cloud.links.kubernetes_engine import KubernetesEngineJobLink
from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartJobOperator
from airflow.providers.google.cloud.triggers.kubernetes_engine import GKEJobTrigger
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from gemma_pipeline import local
from gemma_pipeline.operators.kueue_wait import (
    QueueTimeout,
    jobset_suspension,
    wait_for_admission,
    wait_for_pods,
    wait_until_admitted,
)
from gemma_pipeline.operators.triggers import JOBSET, JobSetTrigger, ProgressGKEJobTrigger
from gemma_pipeline.plan import jobspec, profiles
from jobs.contract.errors import NON_RETRIABLE_EXIT_CODES, non_retriable_legend

NON_RETRIABLE_REASON = "PodFailurePolicy"
DEADLINE_REASON = "DeadlineExceeded"  # the Job controller's reason when activeDeadlineSeconds ran out
JOBSET_FAIL_ACTION_REASON = "FailJobSetFailurePolicyAction"  # the JobSet controller's reason for a FailJobSet rule
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
    template_fields = (*GKEStartJobOperator.template_fields, "queue_timeout_s", "progress_uri", "profile_name", "plan")

    def __init__(self, *, stage: str, profile_name: str = "", queue_timeout_s: str | int = 3600, progress_uri: str = "",
                 gpu_image: str = "", plan: Any = None, **kwargs: Any) -> None:
        """`plan`: this stage's Job as the `plan` task rendered it (arguments, profile, progress object, labels),
        known only at run time: an XCom of the plan task, or a mapped task's share of it (`plan.candidates.plan`)."""
        kwargs.setdefault("base_container_name", jobspec.CONTAINER)  # the container the provider reads logs of
        super().__init__(**kwargs)
        self.stage = stage
        self.profile_name = profile_name
        self.queue_timeout_s = queue_timeout_s
        self.progress_uri = progress_uri
        self.gpu_image = gpu_image
        self.plan = plan

    def _apply_plan(self) -> None:
        if self.plan:
            self.arguments = list(self.plan["arguments"])
            self.profile_name = self.plan["profile_name"]
            self.progress_uri = self.plan["progress_uri"]
            self.labels = dict(self.plan["labels"])

    def job_settings(self) -> jobspec.JobSettings:
        profile = profiles.get(str(self.profile_name))
        if profile.multihost and self.stage not in profiles.MULTIHOST_STAGES:
            raise AirflowFailException(f"{self.stage}_profile: got {profile.name!r} ({profile.hosts} hosts); expected a "
                                       f"single-host profile: only {', '.join(profiles.MULTIHOST_STAGES)} runs on several hosts")
        return jobspec.JobSettings(
            namespace=self.namespace, queue=self.labels[jobspec.QUEUE_LABEL], service_account=self.service_account_name,
            image=jobspec.stage_image(profile, self.image, self.gpu_image), profile=profile,
            ttl_seconds_after_finished=self.ttl_seconds_after_finished, backoff_limit=self.backoff_limit,
            priority_class=self.labels.get(jobspec.PRIORITY_LABEL, ""), active_deadline_seconds=self.active_deadline_seconds or 0)

    def build_job_request_obj(self, context: Any = None) -> k8s.V1Job:
        """The Job from `jobspec.job_manifest`, the builder `k8s/jobs` renders with: the provider creates it and finds
        its pods by the labels it gives every task's pods, and names it as it names every Job."""
        from airflow.providers.cncf.kubernetes.kubernetes_helper_functions import POD_NAME_MAX_LENGTH, add_unique_suffix
        from airflow.providers.cncf.kubernetes.operators.job import JOB_NAME_PREFIX

        self._apply_plan()
        settings = self.job_settings()
        self.image = settings.image
        name = self.name if not self.random_name_suffix else add_unique_suffix(
            name=self.name, max_len=POD_NAME_MAX_LENGTH - len(JOB_NAME_PREFIX))
        body = jobspec.job_manifest(self.stage, settings, list(self.arguments), name=f"{JOB_NAME_PREFIX}{name}",
                                    labels=self.labels, pod_labels=self._get_ti_pod_labels(context))
        job = _k8s("V1Job", body)
        # What the provider keeps of the pod it would have built: where to look for the pods (get_pods).
        self.pod_request_obj = k8s.V1Pod(spec=job.spec.template.spec, metadata=k8s.V1ObjectMeta(
            namespace=self.namespace, labels=dict(job.spec.template.metadata.labels)))
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

    def defer(self, *, trigger: Any, method_name: str, **kwargs: Any) -> Any:
        # The provider builds the GKEJobTrigger; we only swap in its subclass that also logs live progress.
        if isinstance(trigger, GKEJobTrigger) and not isinstance(trigger, ProgressGKEJobTrigger):
            _, trigger_kwargs = trigger.serialize()
            trigger = ProgressGKEJobTrigger(**trigger_kwargs, progress_uri=self.progress_uri)
        return super().defer(trigger=trigger, method_name=method_name, **kwargs)

    def execute(self, context: Any) -> Any:
        if local.backend() == "local":
            return self.execute_local(context)
        self._apply_plan()
        profile = profiles.get(str(self.profile_name))
        if profile.multihost:
            return self.execute_jobset(context, profile)
        try:
            result = super().execute(context)
        except AirflowException as err:
            raise_if_non_retriable(err, getattr(self, "job", None))
            raise
        self._push_usage(context, job_seconds(self.job.to_dict()))  # not deferred: the Job has finished
        return result

    def execute_complete(self, context: Any, event: dict, **kwargs: Any) -> Any:
        self._apply_plan()
        if event.get("status") == "error" and self.get_logs:
            self._show_failed_pod_logs(event)  # the provider raises before fetching logs; the reason is in them
        try:
            result = super().execute_complete(context, event, **kwargs)
        except AirflowException as err:
            raise_if_non_retriable(err, event.get("job"))
            raise
        self._push_usage(context, job_seconds(event.get("job") or {}))
        return result

    def execute_jobset(self, context: Any, profile: profiles.Profile) -> None:
        """A multi-host stage on GKE: the JobSet around the Job this task builds (`jobspec.jobset_manifest`, as
        `k8s/jobs`), created through the provider's hook, waited on for Kueue admission, then deferred until it
        reaches a terminal state. The provider has no JobSet operator that waits."""
        job = self.build_job_request_obj(context)
        body = jobspec.jobset_manifest(_api_client().sanitize_for_serialization(job), profile)
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        group, version, plural = JOBSET
        custom = self.hook.custom_object_client
        custom.create_namespaced_custom_object(group, version, namespace, plural, body)
        self.log.info("created JobSet %s/%s: %d hosts of profile %s", namespace, name, profile.hosts, profile.name)

        def read() -> tuple[bool, str]:
            return jobset_suspension(custom.get_namespaced_custom_object(group, version, namespace, plural, name))

        try:
            wait_until_admitted(read, custom, f"JobSet {namespace}/{name}", namespace, float(self.queue_timeout_s),
                                log=self.log.info)
        except QueueTimeout as err:
            self.log.error("%s", err)
            custom.delete_namespaced_custom_object(group, version, namespace, plural, name, propagation_policy="Foreground")
            raise AirflowFailException(str(err)) from err
        self.defer(trigger=JobSetTrigger(name=name, namespace=namespace, cluster_url=self.cluster_url,
                                         ssl_ca_cert=self.ssl_ca_cert, gcp_conn_id=self.gcp_conn_id,
                                         impersonation_chain=self.impersonation_chain,
                                         use_dns_endpoint=self.use_dns_endpoint,
                                         poll_interval=float(self.job_poll_interval), progress_uri=self.progress_uri),
                   method_name="execute_jobset_complete")

    def execute_jobset_complete(self, context: Any, event: dict) -> None:
        jobset = event.get("jobset") or {}
        if self.get_logs and event.get("name"):
            self._write_jobset_logs(event["name"], event.get("namespace") or self.namespace)
        if event.get("status") != "success":
            conditions = (jobset.get("status") or {}).get("conditions") or []
            failed = next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), {})
            message = f"{event.get('message')}: {failed.get('reason', '')} {failed.get('message', '')}".strip()
            if failed.get("reason") == JOBSET_FAIL_ACTION_REASON:  # the NonRetriableExit or Deadline rule
                raise AirflowFailException(f"{message} (a host exited with a non-retriable code: {non_retriable_legend()}; "
                                           "or the Job ran past the profile's deadline; see the pod logs)")
            raise AirflowException(message)
        self._push_usage(context, jobset_seconds(jobset))

    def _push_usage(self, context: Any, seconds: float | None, backend: str = "gke") -> None:
        context["ti"].xcom_push(key="usage", value={"backend": backend, "profile": str(self.profile_name),
                                                    "seconds": seconds})

    def execute_local(self, context: Any) -> None:
        """Run the Job this task would submit as a local subprocess (see `gemma_pipeline.local`)."""
        # Building the Job asks the Kubernetes hook only whether Airflow runs inside a cluster; it does not.
        self.__dict__["hook"] = SimpleNamespace(is_in_cluster=False)
        job = self.build_job_request_obj(context)
        profile = profiles.get(str(self.profile_name))
        if profile.multihost:  # what GKE would run: the JobSet around this Job, its hosts as local processes
            jobset = jobspec.jobset_manifest(_api_client().sanitize_for_serialization(job), profile)
            container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
        else:
            container = local.container_of(job)
        root = local.local_root()
        ti = context["ti"]
        with local.Emulator(root) as emulator:
            for bucket in sorted(set(re.findall(r"gs://([^/\s]+)", " ".join(container.get("args", []))))):
                emulator.ensure_bucket(bucket)
            with local.scratch_dir(root, job.metadata.name, f"try-{ti.try_number}") as scratch:
                started = time.monotonic()
                if profile.multihost:
                    code = self._run_hosts(container, profile.hosts, scratch, job.metadata.name, emulator.url)
                else:
                    command, env = local.process_spec(container, scratch)
                    self.log.info("local backend: running Job %s as %s (emulator %s, scratch %s)",
                                  job.metadata.name, " ".join(command[:3]), emulator.url, scratch)
                    code = local.run_process(command, env, scratch, lambda line: self.log.info("%s", line),
                                             started=lambda process: setattr(self, "_local_processes", [process]))
                seconds = round(time.monotonic() - started, 1)
        # No GKE Job to link to: an empty link config keeps the task's finalizer from logging two
        # "XCom not found" errors per task when it resolves the provider's Job link.
        ti.xcom_push(key=KubernetesEngineJobLink.key, value={})
        if code != 0:
            message = f"stage {self.stage} exited with code {code} after {seconds} s (local backend)"
            if code in NON_RETRIABLE_EXIT_CODES:
                raise AirflowFailException(f"{message}: non-retriable ({non_retriable_legend()})")
            raise AirflowException(f"{message}: retriable")
        self._push_usage(context, seconds, backend="local")
        self.log.info("stage %s finished in %s s", self.stage, seconds)

    def _run_hosts(self, container: dict[str, Any], hosts: int, scratch: Any, name: str, emulator_url: str) -> int:
        """The JobSet's hosts on this machine: one process each, JAX's coordinator on a free local port, the
        process index where Kubernetes puts it (JOB_COMPLETION_INDEX)."""
        coordinator = f"127.0.0.1:{local.free_port()}"
        specs = []
        for index in range(hosts):
            host_scratch = scratch / f"host-{index}"
            host_scratch.mkdir()
            command, env = local.process_spec(container, host_scratch, fields={jobspec.COORDINATOR_FIELD: coordinator})
            env.update({jobspec.NUM_PROCESSES_ENV: str(hosts), jobspec.COORDINATOR_ENV: coordinator,
                        "JOB_COMPLETION_INDEX": str(index)})  # set here too: TPU profiles leave them to GKE
            specs.append((command, env, host_scratch))
        self.log.info("local backend: running JobSet %s as %d processes of %s (coordinator %s, emulator %s, scratch %s)",
                      name, hosts, " ".join(specs[0][0][:3]), coordinator, emulator_url, scratch)
        return local.run_group(specs, lambda line: self.log.info("%s", line),
                               started=lambda processes: setattr(self, "_local_processes", processes))

    def on_kill(self) -> None:
        processes = getattr(self, "_local_processes", None)
        if processes:
            for process in processes:
                local.terminate(process)  # SIGTERM first: the fine-tune checkpoints, as on preemption
            return
        super().on_kill()

    def _write_jobset_logs(self, name: str, namespace: str) -> None:
        """Every host's pod log, host by host, into the task log (as the provider does for a Job's pod)."""
        try:
            pods = self.client.list_namespaced_pod(namespace, label_selector=f"{jobspec.JOBSET_NAME_LABEL}={name}").items
        except Exception as err:  # logs are a courtesy; the JobSet's outcome below is what matters
            self.log.warning("could not list the pods of JobSet %s: %s", name, err)
            return
        for pod in sorted(pods, key=lambda p: int((p.metadata.annotations or {}).get(jobspec.COMPLETION_INDEX, 0))):
            self.log.info("---- log of host %s (pod %s) ----",
                          (pod.metadata.annotations or {}).get(jobspec.COMPLETION_INDEX, "?"), pod.metadata.name)
            try:
                self._write_logs(pod)
            except Exception as err:
                self.log.warning("could not fetch logs of pod %s: %s", pod.metadata.name, err)

    def _show_failed_pod_logs(self, event: dict) -> None:
        namespace = event.get("pod_namespace") or event.get("namespace")
        for name in event.get("pod_names") or []:
            try:
                self._write_logs(self.hook.get_pod(name, namespace))
            except Exception as err:  # logs are a courtesy; the failure below is what matters
                self.log.warning("could not fetch logs of pod %s: %s", name, err)


def job_seconds(job: dict[str, Any]) -> float | None:
    """How long a finished Job held its hardware: from admission (startTime is set when Kueue unsuspends
    it) to completion, over all of its pod attempts."""
    status = job.get("status") or {}
    start = status.get("start_time") or status.get("startTime")
    end = status.get("completion_time") or status.get("completionTime")
    if not end:
        for condition in status.get("conditions") or []:
            if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
                end = condition.get("last_transition_time") or condition.get("lastTransitionTime")
    if not start or not end:
        return None
    start, end = (t if isinstance(t, datetime) else datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (start, end))
    return round((end.astimezone(UTC) - start.astimezone(UTC)).total_seconds(), 1)


def jobset_seconds(jobset: dict[str, Any]) -> float | None:
    """Seconds from a JobSet's creation to its terminal condition: the JobSet keeps no start time, so the
    admission wait is included and this is an upper bound on how long it held its hosts."""
    start = (jobset.get("metadata") or {}).get("creationTimestamp")
    end = next((c.get("lastTransitionTime") for c in (jobset.get("status") or {}).get("conditions") or []
                if c.get("type") in ("Completed", "Failed") and c.get("status") == "True"), None)
    if not start or not end:
        return None
    start, end = (datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (start, end))
    return round((end - start).total_seconds(), 1)


def failed_by_pod_failure_policy(job: Any) -> bool:
    """Did the Job controller fail this Job through its podFailurePolicy (a FailJob rule: exit code 2, 3 or
    4)? Read from the Job's own status conditions, not from an error message."""
    if job is None:
        return False
    if not isinstance(job, dict):
        job = job.to_dict()
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True"
               and c.get("reason") == NON_RETRIABLE_REASON for c in conditions)


def failed_by_deadline(job: Any) -> bool:
    """Did the Job run out of its activeDeadlineSeconds (the profile's deadline)? A retry would hold the hardware
    for another deadline, so it is not retried."""
    if job is None:
        return False
    conditions = ((job if isinstance(job, dict) else job.to_dict()).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Failed" and c.get("status") == "True" and c.get("reason") == DEADLINE_REASON
               for c in conditions)


def raise_if_non_retriable(error: AirflowException, job: Any) -> None:
    if isinstance(error, AirflowFailException):
        return
    if failed_by_pod_failure_policy(job):
        raise AirflowFailException(
            f"{error} (the stage exited with a non-retriable code: {non_retriable_legend()}; see the pod log)") from error
    if failed_by_deadline(job):
        raise AirflowFailException(
            f"{error} (the Job ran past its activeDeadlineSeconds, the profile's deadline: not retried, since a retry "
            "would hold the hardware as long again; see the pod log for where it was)") from error
