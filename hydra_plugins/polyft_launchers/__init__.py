"""Hydra loads launchers only from the hydra_plugins namespace: polyft's, whose code is
polyft.launchers, are named here (`_target_: hydra_plugins.polyft_launchers.SlurmLauncher`)."""

from polyft.launchers import PerPointLocalLauncher, PerPointSlurmLauncher


class SlurmLauncher(PerPointSlurmLauncher):
    pass


class LocalLauncher(PerPointLocalLauncher):
    pass
