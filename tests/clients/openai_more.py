# More of the OpenAI API through the `openai` client (tests/tests/openai.rs): content
# parts, roles, n, seeds, penalties, log-probabilities, prompt lists, refusals; prints JSON.
# usage: python3 openai_more.py BASE_URL PENALISED_PROMPT
import json, sys, urllib.request, urllib.error
from openai import OpenAI
base = sys.argv[1]
c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
model = "smollm2-135m-instruct"
out = {}
q = "What is the capital of France?"
parts = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": [{"type": "text", "text": q}]}]
out["parts"] = c.chat.completions.create(model=model, messages=parts, max_tokens=24).choices[0].message.content
dev = [{"role": "developer", "content": "You are brief."}, {"role": "user", "content": q}]
out["developer"] = c.chat.completions.create(model=model, messages=dev, max_tokens=24).choices[0].message.content
pen = dict(model=model, prompt=sys.argv[2], max_tokens=24, extra_body={"ignore_eos": True})
out["penalised"] = c.completions.create(frequency_penalty=0.8, presence_penalty=0.5, **pen).choices[0].text
out["unpenalised"] = c.completions.create(**pen).choices[0].text
r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=16, n=2)
out["n"] = {"texts": [x.text for x in r.choices], "indexes": [x.index for x in r.choices],
            "usage": [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]}
texts, finishes, usage = {}, {}, None
for ch in c.completions.create(model=model, prompt="The capital of France is", max_tokens=16, n=2, stream=True,
                               stream_options={"include_usage": True}):
    for x in ch.choices:
        texts[x.index] = texts.get(x.index, "") + (x.text or "")
        if x.finish_reason:
            finishes[x.index] = x.finish_reason
    if getattr(ch, "usage", None):
        usage = [ch.usage.prompt_tokens, ch.usage.completion_tokens, ch.usage.total_tokens]
out["n_stream"] = {"texts": [texts[i] for i in sorted(texts)], "finishes": [finishes[i] for i in sorted(finishes)], "usage": usage}
out["ids"] = [c.completions.create(model=model, prompt="Hi", max_tokens=1).id for _ in range(3)]
r = c.chat.completions.create(model=model, messages=dev, max_tokens=8, logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
out["chat_logprobs"] = {"text": r.choices[0].message.content, "n": r.usage.completion_tokens,
    "tokens": [e.token for e in lp], "logprobs": [e.logprob for e in lp],
    "top": [[t.token for t in e.top_logprobs] for e in lp], "top_lp": [[t.logprob for t in e.top_logprobs] for e in lp]}
entries, text = [], ""
for ch in c.chat.completions.create(model=model, messages=dev, max_tokens=8, logprobs=True, top_logprobs=2, stream=True):
    if ch.choices:
        text += ch.choices[0].delta.content or ""
        if ch.choices[0].logprobs and ch.choices[0].logprobs.content:
            entries += [[e.token, e.logprob] for e in ch.choices[0].logprobs.content]
out["chat_logprobs_stream"] = {"text": text, "entries": entries}
r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=6, logprobs=1)
l = r.choices[0].logprobs
out["completion_logprobs"] = {"text": r.choices[0].text, "tokens": l.tokens, "offsets": l.text_offset,
                              "n_top": [len(t) for t in l.top_logprobs], "lp": l.token_logprobs}
r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=16, logprobs=1, stop=["."])
out["stop_logprobs"] = {"text": r.choices[0].text, "tokens": r.choices[0].logprobs.tokens, "finish": r.choices[0].finish_reason}
poem = dict(model=model, prompt="Write a poem about the sea:", max_tokens=16, temperature=1.5)
r = c.completions.create(n=2, seed=5, **poem)
out["seeded"] = {"choices": [x.text for x in r.choices],
                 "alone": [c.completions.create(seed=s, **poem).choices[0].text for s in (5, 6)]}
out["unseeded"] = [c.completions.create(max_tokens=32, extra_body={"ignore_eos": True},
                                        **{k: v for k, v in poem.items() if k != "max_tokens"}).choices[0].text
                   for _ in range(2)]
r = c.completions.create(model=model, prompt=["Hi", "The capital of France is"], max_tokens=16)
out["batch"] = {"texts": [x.text for x in r.choices], "prompt_tokens": r.usage.prompt_tokens}
def raw(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return [resp.status, json.loads(resp.read())]
    except urllib.error.HTTPError as e:
        return [e.code, json.loads(e.read())]
hi = [{"role": "user", "content": "hi"}]
out["refused"] = {
    "logprobs": raw("/v1/chat/completions", {"model": model, "messages": hi, "logprobs": True, "top_logprobs": 21}),
    "image": raw("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}),
    "tools": raw("/v1/chat/completions", {"model": model, "messages": hi, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    "json": raw("/v1/chat/completions", {"model": model, "messages": hi, "response_format": {"type": "json_object"}}),
    "penalty": raw("/v1/completions", {"model": model, "prompt": "hi", "presence_penalty": 3.0}),
    "tool_message": raw("/v1/chat/completions", {"model": model, "messages": hi + [{"role": "tool", "content": "42", "tool_call_id": "x"}]}),
}
print(json.dumps(out))
