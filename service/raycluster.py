"""The Ray cluster the control plane submits to: a configured one (FORKRL_RAY_ADDRESS), or else a local
Ray head that the service starts on startup, owns, and stops on shutdown. Either way the service talks
to it through one Jobs API client (service/rayjobs.py). With FORKRL_ADMISSION=kueue each job brings its
own cluster instead, as a RayJob that Kueue admits (service/kueue.py)."""

from __future__ import annotations

from service.rayjobs import JobBackend, LocalRayHead, RayJobs
from service.settings import Settings

__all__ = ["RayCluster"]


class RayCluster:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.head: LocalRayHead | None = None  # only when the service owns the head
        self._jobs: JobBackend | None = None

    @property
    def started(self) -> bool:
        return self._jobs is not None

    @property
    def jobs(self) -> JobBackend:
        """The Jobs API client of the cluster (or the RayJobs of Kueue mode)."""
        assert self._jobs is not None, "RayCluster.start() first"
        return self._jobs

    def start(self) -> None:
        s = self.settings
        if s.admission == "kueue":
            from service.kueue import KueueJobs

            self._jobs = KueueJobs(
                s.kueue_rayjob_template, s.kueue_local_queue, s.kueue_namespace, s.kueue_priority_classes,
                s.ray_auth_token,
            )  # fmt: skip
        elif s.ray_address:
            self._jobs = RayJobs(s.ray_address, s.ray_auth_token)
        else:
            self.head = LocalRayHead(s.ray_num_cpus)
            self.head.start()
            self._jobs = RayJobs(self.head.address, self.head.token)

    def stop(self) -> None:
        if self.head is not None:
            self.head.stop()
