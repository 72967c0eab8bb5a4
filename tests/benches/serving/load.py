"""Load generator of the serving bench: C concurrent streaming completions
(different prompts, greedy, ignore_eos, N tokens each) against an
OpenAI-compatible /v1/completions (llama-cluster's coordinator or
llama-server). Prints JSON: wall time, tokens, aggregate tokens/s, and the
time per output token of each request (first token excluded)."""
import json, sys, threading, time, urllib.request

base, model, conc, n_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def one(i, out):
    body = json.dumps({"model": model, "prompt": f"Write a long story about robot number {i} and its friends.",
                       "max_tokens": n_tokens, "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"content-type": "application/json"})
    t0 = time.time()
    times = []
    try:
        with urllib.request.urlopen(req, timeout=1200) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.time())
    except Exception as e:
        out[i] = {"error": str(e)}
        return
    out[i] = {"start": t0, "times": times}

out = {}
ts = [threading.Thread(target=one, args=(i, out)) for i in range(conc)]
t0 = time.time()
[t.start() for t in ts]
[t.join() for t in ts]
wall = time.time() - t0
errors = [v["error"] for v in out.values() if "error" in v]
tokens = sum(len(v.get("times", [])) for v in out.values())
tpot = []
for v in out.values():
    t = v.get("times", [])
    if len(t) > 1:
        tpot.append((t[-1] - t[0]) / (len(t) - 1))
print(json.dumps({"wall": wall, "tokens": tokens, "tok_s": tokens / wall, "tpot": sorted(tpot), "errors": errors[:3]}))
