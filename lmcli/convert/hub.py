"""A model id on the Hugging Face hub, downloaded (or found in the local hub cache) with huggingface_hub."""

from pathlib import Path

from lmcli.errors import UserError

PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def download(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=PATTERNS + ["*.safetensors"]))
        if not list(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=PATTERNS + ["*.bin"]))
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated on the Hugging Face hub: accept its licence there and log in "
                        "(huggingface-cli login or HF_TOKEN)")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise UserError(f"{repo_id} is not a model on the Hugging Face hub (or it is private: set HF_TOKEN)")
    except Exception as e:
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else f"the hub is unreachable: {type(e).__name__}"
        raise UserError(f"cannot download {repo_id} from the Hugging Face hub ({why}) and it is not in the local "
                        "hub cache; download the model folder elsewhere and pass its path")
    return path
