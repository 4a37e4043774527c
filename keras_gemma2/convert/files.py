"""Reading a preset's files: local folders and network handles alike."""

import os

from keras_hub.src.utils.preset_utils import get_file

from keras_gemma2.convert import damaged


class PresetFiles:
    """The files of a preset folder or a `scheme://` handle.

    Network handles (`hf://`, `kaggle://`) download one file at a time
    through KerasHub's `get_file`; failures become errors that say what to
    do instead (accept a license, set credentials, or pass a local folder).
    """

    def __init__(self, preset):
        self.preset = str(preset)
        self.is_local = "://" not in self.preset
        if self.is_local and not os.path.isdir(self.preset):
            raise FileNotFoundError(
                f"{self.preset!r} is not a folder. Pass a preset folder, a "
                "registered preset name, or an hf:// or kaggle:// handle."
            )

    def exists(self, name):
        if self.is_local:
            return os.path.exists(os.path.join(self.preset, name))
        try:
            self.path(name)
        except FileNotFoundError:
            return False
        return True

    def listdir(self):
        """File names of a local folder (empty for network handles)."""
        return sorted(os.listdir(self.preset)) if self.is_local else []

    def path(self, name):
        """A local path to `name`, downloading it if needed."""
        if self.is_local:
            path = os.path.join(self.preset, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} does not exist.")
            return path
        try:
            return get_file(self.preset, name)
        except Exception as error:  # network, auth and license errors
            if isinstance(error, FileNotFoundError) and not _unreachable(error):
                raise
            raise _network_error(self.preset, name, error) from error

    def json(self, name, what=None, fix=damaged.PRESET_FIX):
        """The JSON object in `name`; a damaged file raises a
        `DamagedFileError` naming it."""
        return damaged.read_json(self.path(name), what or f"a {name}", fix)


def _unreachable(error):
    """Whether a "not found" hides a hub that could not be reached."""
    while error is not None:
        if (
            "LocalEntryNotFound" in type(error).__name__
            or "Offline" in type(error).__name__
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _network_error(preset, name, error):
    text = str(error)
    if "kaggle" in preset and ("403" in text or "consent" in text.lower()):
        return PermissionError(
            f"Kaggle refused {preset} ({name}): accept the model's license "
            "on its Kaggle page (kaggle.com/models/keras/gemma2, 'Request "
            "access'), then put your API credentials in ~/.kaggle/kaggle.json "
            "or the KAGGLE_USERNAME and KAGGLE_KEY environment variables."
        )
    if "hf://" in preset and (
        "401" in text or "403" in text or "gated" in text
    ):
        return PermissionError(
            f"Hugging Face refused {preset} ({name}): accept the model's "
            "license on its page, then log in (`hf auth login`) or set "
            "HF_TOKEN."
        )
    return ConnectionError(
        f"Could not fetch {name} of {preset}: {type(error).__name__}: "
        f"{text[:300]}. If this machine is offline, download the preset "
        "elsewhere and pass its local folder instead."
    )
