"""Upload an export to the Hugging Face hub (eval.py --push_to_hub), with huggingface_hub's client.

The token is huggingface_hub's own (HF_TOKEN, or the one `hf auth login` saved). Everything that
can be checked without the network (the repo id, offline mode, a token) is checked by
`check_push` before any work; a failed upload is one line and leaves every local file as it was.
"""

import os

from gpt_interventions.errors import UsageError

NETWORK_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def check_push(repo_id):
    """The token to push with; UsageError for a bad repo id, offline mode or no token."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:  # a bare name would land in the token's namespace, unlike the card's id
            raise HFValidationError("no owner")
    except HFValidationError:
        raise UsageError(f"--push_to_hub={repo_id!r} is not a Hugging Face repo id; "
                         "use OWNER/NAME (letters, digits, '-', '_', '.')") from None
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise UsageError("--push_to_hub needs the network but HF_HUB_OFFLINE is set; "
                         "unset it, or export with --export_hf=DIR and upload DIR later")
    token = huggingface_hub.get_token()
    if not token:
        raise UsageError("--push_to_hub needs a Hugging Face token with write access: "
                         "set HF_TOKEN or run `hf auth login`")
    return token


def push_to_hub(folder, repo_id, private, token, kept=False):
    """Create `repo_id` (private unless told otherwise; kept if it exists) and upload every file of
    `folder` in one commit; returns (url, private). Refuses to upload a model meant to be private
    into a public repo that already exists. `kept`: the folder stays after a failure (say so)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        is_private = bool(api.model_info(repo_id).private)
        if private and not is_private:
            raise UsageError(f"{repo_id} exists on the hub and is public; pass --public=True to upload "
                             f"to it, or choose another repo id{_later(kept, folder, repo_id)}")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          commit_message="Upload a model exported by gpt-interventions (eval.py --export_hf)")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = {401: "the token was refused; run `hf auth login` or set HF_TOKEN",
               403: "this token may not write there (a read-only token, or another user's namespace)"}.get(
                   status, _first_line(e))
        raise UsageError(f"cannot upload to {repo_id} on the Hugging Face hub: {why}{_later(kept, folder, repo_id)}") from None
    except Exception as e:
        if not (isinstance(e, OSError) or type(e).__module__.split(".")[0] in NETWORK_LIBRARIES):
            raise
        raise UsageError(f"cannot reach the Hugging Face hub to upload {repo_id} ({_first_line(e)})"
                         f"{_later(kept, folder, repo_id)}") from None
    return str(url), is_private


def _later(kept, folder, repo_id):
    return f"; {folder} is kept: `hf upload {repo_id} {folder}` uploads it later" if kept else ""


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
