# The coordinator's OpenAI API through the `openai` client (tests/tests/openai.rs):
# models, chat and completions, streamed and not, and bad requests; prints JSON.
# usage: python3 openai_client.py BASE_URL
import json, sys, time, urllib.request, urllib.error
from openai import OpenAI
base = sys.argv[1]
c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
out = {}
listed = list(c.models.list())
out["models"] = [m.id for m in listed]
model = out["models"][0]
m = c.models.retrieve(model)
out["retrieve"] = {"id": m.id, "object": m.object, "created": m.created, "listed_created": listed[0].created}
try:
    c.models.retrieve("gpt-9")
    out["retrieve_missing"] = None
except Exception as e:
    out["retrieve_missing"] = [type(e).__name__, getattr(e, "status_code", None), getattr(e, "code", None)]
# Ready once the coordinator's first poll is in (bounded wait).
for _ in range(50):
    try:
        with urllib.request.urlopen(base + "/health", timeout=30) as resp:
            out["health"] = [resp.status, json.loads(resp.read())]
            break
    except urllib.error.HTTPError as e:
        out["health"] = [e.code, json.loads(e.read())]
        time.sleep(0.2)
msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is the capital of France?"}]
r = c.chat.completions.create(model=model, messages=msgs, max_tokens=24)
out["chat"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
               "usage": [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens], "object": r.object}
parts, finish, usage = [], None, None
for ch in c.chat.completions.create(model=model, messages=msgs, max_tokens=24, stream=True):
    if ch.choices:
        parts.append(ch.choices[0].delta.content or "")
        finish = ch.choices[0].finish_reason or finish
    if getattr(ch, "usage", None):
        usage = [ch.usage.prompt_tokens, ch.usage.completion_tokens, ch.usage.total_tokens]
out["chat_stream"] = {"text": "".join(parts), "finish": finish, "usage": usage, "chunks": len(parts)}
r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=16)
out["completion"] = {"text": r.choices[0].text, "finish": r.choices[0].finish_reason,
                     "usage": [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]}
parts = [ch.choices[0].text for ch in c.completions.create(model=model, prompt="The capital of France is", max_tokens=16, stream=True) if ch.choices]
out["completion_stream"] = "".join(parts)
def raw(path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return [resp.status, json.loads(resp.read())]
    except urllib.error.HTTPError as e:
        return [e.code, json.loads(e.read())]
out["errors"] = {
    "unknown_model": raw("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
    "empty_messages": raw("/v1/chat/completions", {"model": model, "messages": []}),
    "max_tokens_zero": raw("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 0}),
    "max_tokens_huge": raw("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 10**9}),
    "malformed": raw("/v1/completions", b"{not json"),
    "no_model": raw("/v1/completions", {"prompt": "hi"}),
    "bad_role": raw("/v1/chat/completions", {"model": model, "messages": [{"role": "wizard", "content": "hi"}]}),
}
try:
    c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    out["client_error"] = None
except Exception as e:
    out["client_error"] = [type(e).__name__, getattr(e, "status_code", None)]
print(json.dumps(out))
