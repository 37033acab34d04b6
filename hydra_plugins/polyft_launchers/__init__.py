"""Hydra loads launchers only from the hydra_plugins namespace: polyft's, whose code is
polyft.cli.launchers, are named here (`_target_: hydra_plugins.polyft_launchers.SlurmLauncher`)."""

from polyft.cli.launchers import PerPointLocalLauncher, PerPointSlurmLauncher


class SlurmLauncher(PerPointSlurmLauncher):
    pass


class LocalLauncher(PerPointLocalLauncher):
    pass
