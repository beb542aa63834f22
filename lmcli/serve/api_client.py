"""APIClient: the server's calls from Python, named as in LMDeploy's client. Every call is a generator: one item
for a plain request, one per chunk with stream=True.

    from lmcli.serve.api_client import APIClient
    client = APIClient("http://127.0.0.1:23333")
    model = client.available_models[0]
    for item in client.chat_completions_v1(model=model, messages=[{"role": "user", "content": "Hi"}]):
        print(item)
"""

from typing import Iterator, Optional, Union

import httpx

from lmcli.serve.stream import events


class APIClientError(Exception):
    """The server said no (status 4xx/5xx, or an error in the middle of a stream)."""

    def __init__(self, status: Optional[int], message: str, type: Optional[str] = None, code: Optional[str] = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message, self.type, self.code = status, message, type, code


class APIClient:
    def __init__(self, api_server_url: str, api_key: Optional[str] = None, timeout: Optional[float] = None):
        """timeout: seconds to wait for the server to answer or send the next chunk (None: as long as it takes)."""
        self.url = api_server_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self.http = httpx.Client(base_url=self.url, headers=headers,
                                     timeout=httpx.Timeout(timeout, connect=min(timeout or 10, 10)))
        except (httpx.InvalidURL, ValueError) as e:
            raise APIClientError(None, f"not a URL: {api_server_url!r} ({e})") from None
        self._models: Optional[list[str]] = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- calls ----

    @property
    def available_models(self) -> list[str]:
        if self._models is None:
            try:
                self._models = [m["id"] for m in self._get("/v1/models")["data"]]
            except (KeyError, TypeError):
                raise APIClientError(None, f"{self.url}/v1/models is not a model list: not an lm api_server?") \
                    from None
        return self._models

    def health(self) -> dict:
        """{"status": "ok"} when the engine can generate; raises APIClientError (503) otherwise."""
        return self._get("/health")

    def encode(self, input: Union[str, list[str]], do_preprocess: bool = False, add_bos: bool = True):
        """(input_ids, length) of a text, or of each text of a list."""
        out = self._post("/v1/encode", {"input": input, "do_preprocess": do_preprocess, "add_bos": add_bos})
        return out["input_ids"], out["length"]

    def chat_completions_v1(self, model: str, messages: Union[str, list], temperature: float = 0.7,
                            top_p: float = 1.0, n: int = 1, max_tokens: Optional[int] = None,
                            stop: Optional[Union[str, list[str]]] = None, stream: bool = False,
                            presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                            repetition_penalty: float = 1.0, ignore_eos: bool = False,
                            skip_special_tokens: bool = True, top_k: int = 40, **kwargs) -> Iterator[dict]:
        """/v1/chat/completions; messages may be a string (one user message). Yields the response, or with
        stream=True each chunk (dicts in OpenAI's format)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = dict(model=model, messages=messages, temperature=temperature, top_p=top_p, n=n,
                    max_tokens=max_tokens, stop=stop, stream=stream, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                    ignore_eos=ignore_eos, skip_special_tokens=skip_special_tokens, top_k=top_k, **kwargs)
        yield from self._generate("/v1/chat/completions", body, stream, sse=True)

    def completions_v1(self, model: str, prompt: Union[str, list], temperature: float = 0.7, n: int = 1,
                       max_tokens: Optional[int] = 16, stream: bool = False,
                       stop: Optional[Union[str, list[str]]] = None, top_p: float = 1.0, top_k: int = 40,
                       repetition_penalty: float = 1.0, ignore_eos: bool = False, **kwargs) -> Iterator[dict]:
        """/v1/completions: yields the response, or with stream=True each chunk."""
        body = dict(model=model, prompt=prompt, temperature=temperature, n=n, max_tokens=max_tokens, stream=stream,
                    stop=stop, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                    ignore_eos=ignore_eos, **kwargs)
        yield from self._generate("/v1/completions", body, stream, sse=True)

    def chat_interactive_v1(self, prompt: Union[str, list], session_id: int = -1, interactive_mode: bool = False,
                            stream: bool = False, stop: Optional[Union[str, list[str]]] = None,
                            request_output_len: Optional[int] = None, top_p: float = 0.8, top_k: int = 40,
                            temperature: float = 0.8, repetition_penalty: float = 1.0, ignore_eos: bool = False,
                            **kwargs) -> Iterator[dict]:
        """/v1/chat/interactive: with interactive_mode=True the server keeps the session's history. Yields
        {"text", "tokens", "input_tokens", "history_tokens", "finish_reason", "session_id"}: once, or with
        stream=True as the text comes (each item holds the new text)."""
        body = dict(prompt=prompt, session_id=session_id, interactive_mode=interactive_mode, stream=stream,
                    stop=stop, request_output_len=request_output_len, top_p=top_p, top_k=top_k,
                    temperature=temperature, repetition_penalty=repetition_penalty, ignore_eos=ignore_eos, **kwargs)
        yield from self._generate("/v1/chat/interactive", body, stream, sse=False)

    def cancel(self, session_id: int) -> dict:
        """Stop the session's running turn; the session stays usable."""
        return next(self.chat_interactive_v1("", session_id=session_id, cancel=True))

    def end_session(self, session_id: int) -> None:
        """Forget the session's history and free its KV cache on the server."""
        for _ in self.chat_interactive_v1("", session_id=session_id, interactive_mode=False, request_output_len=0):
            pass

    # ---- transport ----

    def _get(self, path: str) -> dict:
        return self._json(self._check(self._send(lambda: self.http.get(path))))

    def _post(self, path: str, body: dict) -> dict:
        return self._json(self._check(self._send(lambda: self.http.post(path, json=body))))

    def _json(self, response: httpx.Response) -> dict:
        try:
            return response.json()
        except ValueError:
            raise APIClientError(response.status_code, f"{self.url} answered {response.request.url.path} with "
                                                       "something that is not JSON: not an lm api_server?") from None

    def _send(self, fn):
        try:
            return fn()
        except (httpx.TransportError, httpx.InvalidURL) as e:
            raise APIClientError(None, f"cannot reach {self.url}: {e}") from None

    def _generate(self, path: str, body: dict, stream: bool, sse: bool) -> Iterator[dict]:
        body = {k: v for k, v in body.items() if v is not None}
        if not stream:
            yield self._post(path, body)
            return
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.is_error:
                    response.read()
                    self._check(response)
                try:
                    for item in events(response.iter_lines(), sse):
                        if "error" in item:
                            e = item["error"]
                            raise APIClientError(None, e.get("message", str(e)), e.get("type"), e.get("code"))
                        yield item
                except ValueError as e:  # a line that is not JSON
                    raise APIClientError(None, f"the server sent {e}") from None
        except (httpx.TransportError, httpx.InvalidURL) as e:
            raise APIClientError(None, f"the connection to {self.url} failed: {e}") from None

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_error:
            try:
                e = response.json()["error"]
                raise APIClientError(response.status_code, e["message"], e.get("type"), e.get("code"))
            except (ValueError, KeyError, TypeError):
                raise APIClientError(response.status_code, response.text[:200] or response.reason_phrase) from None
        return response
