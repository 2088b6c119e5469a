"""The launcher's named errors. Only the command line turns them into exit codes."""


class LaunchError(RuntimeError):
    """The launch request cannot be carried out as given; the message says what to do."""
