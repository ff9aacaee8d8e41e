"""The errors of the profilers package: each names what went wrong and, where it can, what would work."""


class ProfileError(ValueError):
    """A backend, provider or option this installation cannot honour; the message says what it can."""


class PayloadError(ValueError):
    """A model or option sent to a profiler agent is unusable: the agent answers 400 with this message."""


class RemoteProfilerError(ProfileError):
    """The agent refused or failed a request; the message names its URL and its reason."""


class ProfilerUnreachable(RemoteProfilerError):
    """No answer from the agent, after retries."""


class ProfilerBusy(RemoteProfilerError):
    """The agent answered, but stayed busy with other clients' requests for longer than the client waits."""
