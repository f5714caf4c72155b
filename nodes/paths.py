"""The models/maskattn folder, registered with ComfyUI's folder_paths (extra_model_paths.yaml entries kept)."""

from __future__ import annotations

import os

from ..masks.gatefile import EXTENSIONS

FOLDER = "maskattn"


def register_model_folder() -> None:
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    try:  # the folder users are told to put gate files in exists from the first start
        os.makedirs(default, exist_ok=True)
    except OSError:  # a read-only models folder: extra_model_paths.yaml entries still work
        pass
    paths, _ = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.insert(0, default)
    # A (paths, extensions) pair with our extensions: add_model_folder_path alone would list every file.
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def gate_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(FOLDER)


def gate_folders() -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths(FOLDER))


def gate_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"Load MaskAttn Gates: {name!r} is not in {', '.join(folder_paths.get_folder_paths(FOLDER))}. Put gate "
            f"files (.safetensors, or reference .pt checkpoints) there and refresh the page."
        )
    return path


def save_dir() -> str:
    import folder_paths

    return folder_paths.get_folder_paths(FOLDER)[0]
