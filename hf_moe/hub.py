# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Publishing on the Hugging Face Hub: `push` uploads a model folder or an adapter folder as it is on disk.

A model folder carries its safetensors weights, config.json (for our model types with an `auto_map` entry for every
Auto class, next to the flat modeling files, so that `trust_remote_code=True` loads it without hf-moe), generation
config, tokenizer, the card (README.md) and its pictures. An adapter folder carries adapter_config.json, the adapter
weights and the card `hf_moe.cards.write_card` made from PEFT's card metadata plus ours: it is uploaded with
`HfApi.upload_folder`, because `PeftModel.push_to_hub` would replace that card with transformers' generic one.
A folder without a card (e.g. written by `save_pretrained`) gets one rendered by `hf_moe.cards.card_text` (its kind
from `card_kind`: architecture table, parameters, loading code with the repository id), uploaded as README.md in the
same commit; the folder itself is left as it is.

Left behind: checkpoint-* and runs/ sub-folders, hidden files, and pickles (Trainer's training_args.bin; pickled
weights are refused outright). Files are uploaded by huggingface_hub, with its progress bars for large files and
the Hub's deduplication: a second push of an unchanged file uploads and commits nothing for it.
"""

import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from transformers.utils import logging

from .cards import CARD_FILE, card_kind, card_text
from .conversion.layout import OUR_CONFIG_CLASSES, remote_code_files
from .conversion.safetensors_io import FOREIGN_WEIGHT_SUFFIXES
from .preflight import ADAPTER_CONFIG_NAME, check_adapter_folder, check_checkpoint_folder
from .registration import AUTO_CLASSES

logger = logging.get_logger(__name__)

# every folder hf-moe has saved names these Auto classes; the heads added later may be missing from older folders
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")

IGNORE_PATTERNS = ["checkpoint-*", "runs/*", ".*", "*/.*", *(f"*{suffix}" for suffix in FOREIGN_WEIGHT_SUFFIXES)]


def _missing_code_files(folder: Path, config: dict) -> list[str]:
    """The Python files that the config's `auto_map` points at, and those they import with relative imports, that
    `folder` lacks (the files of the hf-moe version that saved the folder: an older one may have fewer)."""
    from transformers.dynamic_module_utils import get_relative_imports

    needed = remote_code_files(config)
    to_read = list(needed)
    while to_read:
        path = folder / to_read.pop()
        if path.is_file():
            imported = {f"{module}.py" for module in get_relative_imports(str(path))} - needed
            needed |= imported
            to_read.extend(imported)
    return sorted(name for name in needed if not (folder / name).is_file())


def _check_remote_code(folder: Path, config: dict) -> None:
    """Our model types must carry what a process without hf-moe needs: auto_map for every Auto class and the flat
    modeling files it points at."""
    auto_map = config.get("auto_map") or {}
    if missing := [name for name in REQUIRED_AUTO_MAP if name not in auto_map]:
        raise ValueError(f"{folder}/config.json: `auto_map` lacks {', '.join(missing)} (allowed: a config saved by "
                         f"hf-moe, whose auto_map names every Auto class); re-save the model with save_pretrained")
    if missing := [auto_class.__name__ for auto_class in AUTO_CLASSES if auto_class.__name__ not in auto_map]:
        logger.warning(f"{folder}/config.json was saved before hf-moe had the heads of {', '.join(missing)}: the "
                       f"published model will not load through them; re-save it with save_pretrained to add them")
    if missing := _missing_code_files(folder, config):
        raise ValueError(f"{folder} lacks the modeling files {', '.join(missing)} that `auto_map` points at; re-save "
                         f"the model with save_pretrained")


def check_folder(path: str | os.PathLike) -> str:
    """'model' or 'adapter': what the folder `path` holds, checked for publishing (ValueError naming the file and
    what is wrong otherwise: `hf_moe.preflight`'s checks, plus our remote code for our model types)."""
    folder = Path(path)
    if folder.is_dir() and (folder / ADAPTER_CONFIG_NAME).is_file():
        check_adapter_folder(folder, "PATH")
        return "adapter"
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has neither config.json (a model) nor {ADAPTER_CONFIG_NAME} (an adapter)")
    config = check_checkpoint_folder(folder, "PATH", trust_remote_code=True)  # uploaded, never run here
    if config.get("model_type") in OUR_CONFIG_CLASSES:
        _check_remote_code(folder, config)
    return "model"


class HubAccessError(ConnectionError):
    """The Hub cannot be used as asked: no login, a refused token, or no connection. One line saying what to do."""


def check_hub_access(api: HfApi) -> str:
    """The user name the Hub at `api.endpoint` knows the token as; `HubAccessError` saying what to do otherwise."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    endpoint = api.endpoint
    try:
        return api.whoami()["name"]
    except LocalTokenNotFoundError:
        raise HubAccessError(f"not logged in to the Hub at {endpoint}: run `hf auth login` or set HF_TOKEN to a "
                             f"write token (from {endpoint}/settings/tokens)") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise HubAccessError(f"the Hub at {endpoint} refused the token (401 Unauthorized): log in again with "
                                 f"`hf auth login` or set HF_TOKEN to a valid write token") from None
        raise HubAccessError(f"the Hub at {endpoint} answered {status} to the login check: "
                             f"{' '.join(str(error).split())[:200]}") from None
    except Exception as error:  # the transport's errors: no network, DNS, TLS, proxy, timeout
        raise HubAccessError(f"cannot reach the Hub at {endpoint} ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:200]}): check the network connection, or set "
                             f"HF_ENDPOINT to a Hub you can reach") from None


def push(path: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, token: str | bool | None = None) -> CommitInfo:
    """Upload the model or adapter folder `path` to the Hub repository `repo_id` (one commit; huggingface_hub splits
    very large folders into several, with progress bars); returns the huggingface_hub `CommitInfo` (`.commit_url`,
    `.oid`, `.repo_url`, `.pr_url` with `create_pr`).

    The repository is created if needed (`private` applies then). `revision`: the branch to commit to, created from
    main if missing; `create_pr`: open a pull request against main instead of committing (the Hub's upload opens
    pull requests against the default branch only, so it does not combine with another `revision`). `token`: as
    huggingface_hub takes it (default: the saved login or HF_TOKEN). Raises ValueError, before anything is uploaded,
    when the folder is not a publishable model or adapter folder or the options conflict, and `HubAccessError`
    when the Hub cannot be reached or the login is missing or refused.
    """
    folder = Path(path)
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"`revision`={revision!r} is invalid with create_pr: pull requests are opened against main "
                         f"(allowed: no revision, or 'main')")
    kind = check_folder(folder)
    has_card = (folder / CARD_FILE).is_file()
    if not has_card:
        card_type = card_kind(folder)
        card = card_text(folder, card_type, repo_id=repo_id)  # rendered before anything is created
    api = HfApi(token=token)
    check_hub_access(api)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    files = [p for p in folder.rglob("*") if p.is_file()]
    logger.info(f"pushing the {kind} folder {folder} ({len(files)} files, "
                f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB before exclusions) to {repo_id}")
    message = f"Upload {kind} with hf-moe"
    if has_card:
        return api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, create_pr=create_pr,
                                 commit_message=message, ignore_patterns=IGNORE_PATTERNS)
    logger.info(f"{folder} has no {CARD_FILE}: uploading a rendered {card_type} card as {CARD_FILE} (the folder "
                f"is left as it is; `hf-moe card {folder}` writes one there)")
    card = card_text(folder, card_type, repo_id=repo_id)  # with the repository id the Hub gave (namespace)
    operations = [*_folder_operations(folder), CommitOperationAdd(CARD_FILE, card.encode("utf-8"))]
    return api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision,
                             create_pr=create_pr)


def _folder_operations(folder: Path) -> list[CommitOperationAdd]:
    """What `HfApi.upload_folder(folder, ignore_patterns=IGNORE_PATTERNS)` uploads, as commit operations."""
    paths = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    kept = filter_repo_objects(paths, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *IGNORE_PATTERNS])
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=paths[name]) for name in kept]


def pushed_url(info: CommitInfo, revision: str | None = None) -> str:
    """Where a push can be seen: the pull request, the branch, or the repository."""
    if info.pr_url:
        return info.pr_url
    return f"{info.repo_url}/tree/{revision}" if revision else str(info.repo_url)
