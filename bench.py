"""
What does a component cost, and what does it buy? Benchmarks that write tables a person reads at a glance.
    python bench.py                                    # the default set: a few minutes on a laptop CPU
    python bench.py --scenario=attention,kvcache --out=bench_out
    python bench.py --quick                            # tiny sizes, seconds (the tests run this)
    python bench.py --scenario=long_context --ckpt=out-x/ckpt.pt
    python bench.py --scenario=long_context --ckpt=out-x/ckpt.pt --eval_len=1024 --sliding_window=256 --attn_sinks=4
    python bench.py --profile                          # + torch.profiler chrome traces and op tables
    python bench.py --plot out-a out-b                 # loss curves of runs (+-std over runs named *-seedN)
Scenarios (one function each): attention, mhsa, ffn, decoding, kvcache, train, long_context; decode_target
(batch-1 decoding speed of a 6-layer model over 2047 tokens against fixed targets, ~6 min on CPU) runs only
when named: --scenario=decode_target. --ckpt takes the inference overrides of sample.py (model.INFERENCE_FLAGS).
Writes OUT/results.json (every number, with device, dtype, torch version and config) and OUT/results.md.
Peak memory (REFERENCE §11.5): torch.cuda.max_memory_allocated() after a reset on GPU; on CPU the peak RSS
(VmHWM) of a fresh subprocess per point. `delta_mb` = peak minus the memory after set-up and one warm-up run:
what the measured work itself needs. --quick measures in-process (faster), except kvcache.
"""
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import model as model_module
from configurator import check_ranges, configure, die, save_json
from model import GPT, GPTConfig, ContiguousKVCache, keep_freed_cpu_memory, peak_flops, training_dtype
from sample import auto_kv_dtype, beam_search, generate, load_checkpoint, model_overrides, reject_shape_flags

# -----------------------------------------------------------------------------
scenario = 'all'       # comma-separated scenario names, or all
out = 'bench_out'      # results.json, results.md, traces, plots
quick = False          # tiny sizes: seconds, for the tests
profile = False        # torch.profiler: OUT/trace_NAME.json (Perfetto) + key_averages table per scenario
ckpt = ''              # long_context: evaluate this checkpoint instead of training tiny models
rope_scaling = None    # --ckpt only: model.INFERENCE_FLAGS overrides as in sample.py; None keeps the checkpoint's
rope_factor = None
sliding_window = None
attn_sinks = None
attn_impl = None
data_dir = ''          # long_context text; default data/shakespeare_char if prepared, else synthetic words
eval_len = 0           # long_context: tokens per evaluated sequence and the RoPE scalings' target length;
                       #   0 = 64x the tiny models' context on CPU (8192), 128x on GPU (32768)
device = 'auto'        # auto = cuda > cpu
dtype = 'auto'         # auto = bfloat16 on CUDA, float32 on CPU (AVX2 CPUs emulate bf16 ~100x slower)
seed = 1337
train_dropout = 0.0    # train scenario: the model's dropout (0.2 = nanoGPT's baby GPT). On CPU its fp32 baseline
                       #   runs PyTorch's stock dropout and SDPA kernels (model.FAST_CPU_DROPOUT = False) and glibc's
                       #   default malloc (train.py: model.keep_freed_cpu_memory)
threads = 0            # torch intra-op threads, 0 = torch's default; 1 is much faster for tiny ops on a busy CPU
# -----------------------------------------------------------------------------
_HERE = os.path.dirname(os.path.abspath(__file__))
_N_VALUES = 16  # long_context needles: a marker token, then one of _N_VALUES value tokens used nowhere else


def cuda():
    return device.startswith('cuda')


def autocast():
    return nullcontext() if dtype == 'float32' else torch.autocast(device.split(':')[0], dtype=getattr(torch, dtype))


def sync():
    if cuda():
        torch.cuda.synchronize()


def size(quick_value, cpu_value, gpu_value):
    return quick_value if quick else gpu_value if cuda() else cpu_value


def tiny_gpt(**kw):
    """Every scenario builds its model here: GPTConfig defaults without biases, overridden by kw."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{'bias': False, **kw})).to(device)


def timeit(fn, iters=3):
    """Median wall ms of fn(), synchronised on GPU (REFERENCE §14; warm up before calling this)."""
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def backward_of(model, fn):
    """One forward (fn() under autocast) + backward of its sum; the grads are freed."""
    with autocast():
        y = fn()
    y.float().sum().backward()
    model.zero_grad(set_to_none=True)


def optimizer_step(model, opt, x):
    """One training step on x (B, T+1); returns the loss (.item() is the sync of a real training loop)."""
    with autocast():
        _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def decode_ms(model, prompt, n_new, strategy, warmup, amp=True, top_k=0, **cache_args):
    """Wall ms of decoding n_new tokens (beam4: beam search, 4 beams), after a warm-up of `warmup` tokens."""
    def run(n):
        with autocast() if amp else nullcontext():
            if strategy == 'beam4':
                return beam_search(model, prompt, n, beam_size=4, **cache_args)
            return generate(model, prompt, n, strategy=strategy, seed=seed, top_k=top_k, **cache_args)
    run(warmup)
    return timeit(lambda: run(n_new), iters=1)


# -----------------------------------------------------------------------------
# peak memory and the measured points (a fresh subprocess per point on CPU)

def _proc_kib(field):  # VmRSS (now) or VmHWM (peak) of this process, Linux
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak():
    """Start a new peak (CUDA stats; on Linux writing 5 to clear_refs resets VmHWM). Returns bytes in use now."""
    if cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return _proc_kib('VmRSS') * 1024
    except OSError:  # not Linux: the fresh subprocess alone isolates a point
        return 0


def peak_bytes():
    if cuda():
        return torch.cuda.max_memory_allocated()
    try:
        return _proc_kib('VmHWM') * 1024
    except OSError:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == 'darwin' else r * 1024  # bytes on macOS, KiB on Linux


# A point (the *_point functions) is a factory(**kw): it builds a model and inputs and returns run() -> dict of
# extra numbers or None. child() finds it by name in the fresh process.
def measure_here(factory, kw, iters=3, warmup=True):
    run = factory(**kw)
    extra = dict(run() or {}) if warmup else {}  # warm-up outside the peak window
    base = reset_peak()
    ms = timeit(lambda: extra.update(run() or {}), iters)
    peak = peak_bytes()
    return {'ms': ms, 'peak_mb': peak / 2**20, 'delta_mb': max(peak - base, 0) / 2**20, **extra}


def measure(factory, fresh=None, iters=3, warmup=True, **kw):
    """Time the point factory(**kw) and its peak memory: in a fresh subprocess on CPU, in-process on GPU. The child's
    malloc gives every block > 64 KiB back to the OS when freed, so its RSS follows the live tensors."""
    fresh = not quick if fresh is None else fresh  # --quick: in-process unless the scenario insists
    if cuda() or not fresh:
        return measure_here(factory, kw, iters, warmup)
    job = dict(name=factory.__name__, kw=kw, iters=iters, warmup=warmup, device=device, dtype=dtype, seed=seed,
               threads=torch.get_num_threads())
    r = subprocess.run([sys.executable, '-c', 'import bench; bench.child()', json.dumps(job)], cwd=_HERE,
                       capture_output=True, text=True, env={**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'})
    if r.returncode:
        raise RuntimeError(f"point {factory.__name__}({kw}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def child():
    global device, dtype, seed
    job = json.loads(sys.argv[1])
    device, dtype, seed = job['device'], job['dtype'], job['seed']
    torch.set_num_threads(job['threads'])
    print(json.dumps(measure_here(globals()[job['name']], job['kw'], job['iters'], job['warmup'])))


def maybe_profile(name, fn, steps=4):
    """--profile: fn under torch.profiler (wait 1, warm-up 1, record the rest); writes OUT/trace_NAME.json (ops,
    allocations, and the Python frames above each op) and prints + saves the table of ops (CUDA time on GPU, CPU
    time otherwise)."""
    if not profile:
        return
    from torch.profiler import ProfilerActivity, schedule

    def ready(p):
        p.export_chrome_trace(os.path.join(out, f'trace_{name}.json'))
        frames = {e.name for e in p.events() if e.is_python_function}
        ops = p.key_averages()
        ops[:] = [a for a in ops if a.key not in frames]  # the frames are in the trace; the table ranks ops
        table = ops.table(sort_by='cuda_time_total' if cuda() else 'cpu_time_total', row_limit=15)
        print(table)
        with open(os.path.join(out, f'profile_{name}.txt'), 'w') as f:
            f.write(table)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    with torch.profiler.profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=steps - 2, repeat=1),
                                on_trace_ready=ready, record_shapes=True, profile_memory=True,
                                with_stack=True) as p:  # with_stack: which line of which function launched an op
        for _ in range(steps):
            fn()
            p.step()


# =============================================================================
# 1. attention core: the formula by hand vs F.scaled_dot_product_attention, forward + backward

def manual_attention(q, k, v):
    """REFERENCE §1.1: softmax(QK^T / sqrt(d) + causal mask) V, with the (T, T) scores materialised in fp32."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)).float() * q.size(-1) ** -0.5
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float('-inf'))
    return att.softmax(-1).to(v.dtype) @ v


def attn_point(T, impl, H, D):
    q, k, v = (torch.randn(1, H, T, D, device=device, dtype=getattr(torch, dtype), requires_grad=True)
               for _ in range(3))
    fn = manual_attention if impl == 'manual' else lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=True)

    def run():
        fn(q, k, v).float().sum().backward()
        q.grad = k.grad = v.grad = None
    return run


def attention():
    H, D = size((2, 16), (4, 64), (16, 64))
    rows = []
    for T in size([32, 64], [128 * 2**i for i in range(6)], [128 * 2**i for i in range(7)]):  # to 4k CPU, 8k GPU
        m, s = (measure(attn_point, iters=1 if T >= 2048 else 3, T=T, impl=impl, H=H, D=D)
                for impl in ('manual', 'sdpa'))
        rows.append(dict(T=T, manual_ms=m['ms'], sdpa_ms=s['ms'], speedup=m['ms'] / s['ms'],
                         manual_mem_mb=m['delta_mb'], sdpa_mem_mb=s['delta_mb'], manual_peak_mb=m['peak_mb'],
                         sdpa_peak_mb=s['peak_mb']))
    maybe_profile('attention', attn_point(rows[len(rows) // 2]['T'], 'manual', H, D))
    return dict(config=dict(B=1, H=H, D=D, causal=True, work='forward+backward'), rows=rows)


# 2. the attention block of model.py: QKV projections + attention + output projection
MHSA_VARIANTS = {'mha manual': dict(attn_impl='manual'), 'mha sdpa': {}, 'mqa sdpa': dict(n_kv_head=1),
                 'mla sdpa': dict(attn_type='mla')}


def mhsa_point(T, variant, n_embd, n_head):
    model = tiny_gpt(n_layer=1, n_head=n_head, n_embd=n_embd, vocab_size=64, block_size=T, pos_emb='rope',
                     **MHSA_VARIANTS[variant])
    attn, pos = model.transformer.h[0].attn, torch.arange(T, device=device)[None]
    a = model.attn_inputs(T, T, pos, pos, None, None, False, device)
    x = torch.randn(1, T, n_embd, device=device, requires_grad=True)
    info = dict(params=sum(p.numel() for p in attn.parameters()),
                kv_bytes_per_token=model.kv_bytes_per_token(getattr(torch, dtype)))

    def run():
        backward_of(model, lambda: attn(x, a))
        return info
    return run


def mhsa():
    n_embd, n_head = size((32, 2), (256, 4), (768, 12))
    rows = [dict(T=T, variant=v, **measure(mhsa_point, T=T, variant=v, n_embd=n_embd, n_head=n_head))
            for T in size([32], [512, 2048], [1024, 4096]) for v in MHSA_VARIANTS]
    maybe_profile('mhsa', mhsa_point(rows[-1]['T'], 'mha sdpa', n_embd, n_head))
    return dict(config=dict(n_embd=n_embd, n_head=n_head, B=1, pos_emb='rope', work='forward+backward'), rows=rows)


# 3. feed-forward: dense MLP variants and MoE (router + top-k of 8 routed experts + 1 shared expert)
FFN_VARIANTS = {'gelu': {}, 'relu2': dict(mlp='relu2'), 'swiglu': dict(mlp='swiglu'),
                'moe top-1 +1 shared': dict(n_experts=8, moe_top_k=1, n_shared_experts=1),
                'moe top-2 +1 shared': dict(n_experts=8, moe_top_k=2, n_shared_experts=1)}


def ffn_point(variant, n_embd, B, T):
    model = tiny_gpt(n_layer=1, n_head=4, n_embd=n_embd, vocab_size=64, block_size=T, **FFN_VARIANTS[variant])
    ffn, x = model.transformer.h[0].mlp, torch.randn(B, T, n_embd, device=device, requires_grad=True)
    total = sum(p.numel() for p in ffn.parameters())
    active = total - (model.num_params(False) - model.num_active_params(False))  # MoE: top_k routed experts run

    def run():
        backward_of(model, lambda: ffn(x))
        r = dict(params=total, active_params=active, flops_per_token=6 * active)  # fwd+bwd of the matmul weights
        for s in model.moe_stats():
            r['expert_load_pct'] = [100 * f for f in s['load']]
            top1 = s['scores'].max(-1).values.float()  # router score of the chosen expert, 10 bins on [0, 1]
            r['router_top1_hist'] = (torch.histc(top1, 10, 0, 1) / top1.numel()).tolist()
        return r
    return run


def ffn():
    n_embd, B, T = size((32, 2, 16), (256, 8, 256), (768, 8, 1024))
    rows = [dict(variant=v, **measure(ffn_point, fresh=False, variant=v, n_embd=n_embd, B=B, T=T))
            for v in FFN_VARIANTS]
    maybe_profile('ffn', ffn_point('moe top-2 +1 shared', n_embd, B, T))
    return dict(config=dict(n_embd=n_embd, mlp_ratio=4, tokens=B * T, work='forward+backward',
                            memory='in-process (timing scenario)'), rows=rows)


# 4. decoding: strategy x KV cache at batch 1 (kv_cache none re-runs the whole context for every token)
def decoding():
    n_new, page = size(16, 256, 2048), size(8, 256, 256)  # CPU: 256, kv_cache none is O(n^2)
    kw = size(dict(n_layer=2, n_head=2, n_embd=32), dict(n_layer=4, n_head=4, n_embd=128),
              dict(n_layer=12, n_head=12, n_embd=768))
    model = tiny_gpt(vocab_size=512, block_size=n_new + 16, pos_emb='rope', **kw).eval()
    prompt, rows = list(range(1, 17)), []
    for cache in ('none', 'contiguous', 'paged'):
        for strategy in ('greedy', 'sample', 'beam4'):
            ms = decode_ms(model, prompt, n_new, strategy, warmup=4, kv_cache=cache, page_size=page)
            rows.append(dict(kv_cache=cache, strategy=strategy, new_tokens=n_new, tok_s=1000 * n_new / ms,
                             ms_per_token=ms / n_new))
    maybe_profile('decoding', lambda: generate(model, prompt, 32, kv_cache='paged', page_size=page))
    return dict(config=dict(**kw, vocab_size=512, pos_emb='rope', batch=1, prompt=len(prompt), page_size=page,
                            note='beam4 tok/s counts the tokens of the returned hypothesis (4 rows run)'), rows=rows)


# 4b. decoding speed at length: 2047 tokens, batch 1, against fixed targets (opt-in, ~6 min on a 2-core CPU)
TARGETS_TITLE = 'targets: cached >= 300 tok/s and >= 60x no cache, beam 4 <= 2.5x greedy'


def decode_target():
    """6L/6H/384 RoPE, vocab 8192, batch 1, 2047 new tokens from a 1-token prompt, random weights: tok/s per
    cache and strategy, for fp32 weights, bf16 weights, and (greedy only) fp32 weights stored transposed, int8
    weights with fp32 or bf16 activations and weight-only bf16, each with sample.py's kv_dtype=auto cache
    (sample.auto_kv_dtype), and (full runs, contiguous greedy) int8 + bf16 under torch.compile, its compile time
    in config.compile_s; vs_fp32 = greedy tok/s over fp32's, one run.
    Targets: cached >= 300 tok/s and >= 60x kv_cache='none'; beam 4 <= 2.5x greedy per token.
    'none' is estimated, not run (~30 min here): its step at context L is one forward over L tokens, timed at
    9 values of L and summed over L = 1..n by linear interpolation."""
    n_new = 24 if quick else 2047
    kw = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512) if quick else \
        dict(n_layer=6, n_head=6, n_embd=384, vocab_size=8192)
    runs = [('contiguous', 'greedy'), ('paged', 'greedy'), ('paged+offload', 'greedy'), ('contiguous', 'sample'),
            ('contiguous', 'beam4'), ('paged', 'beam4')]
    rows, targets, floor = [], [], {}
    # int8: sample.py --quantize=int8 [--dtype=bfloat16]; bf16-only: --quantize=bf16 (fp32 activations);
    # float32-cols: sample.py's CPU fp32 default, wide weights stored transposed (GPT.transpose_wide_weights)
    # int8+bf16 compiled: sample.py --quantize=int8 --dtype=bfloat16 --compile=True (full runs only: ~40 s to compile)
    for weights in ('float32', 'float32-cols', 'bfloat16', 'int8', 'int8+bf16', 'bf16-only') + \
            (() if quick else ('int8+bf16 compiled',)):
        model = tiny_gpt(block_size=n_new + 1, pos_emb='rope', **kw).eval()
        act = 'bfloat16' if weights.startswith(('int8+bf16', 'bfloat16')) else 'float32'
        model = model.to(getattr(torch, act))
        model = model.quantize_int8() if weights.startswith('int8') else model
        model = model.quantize_bf16() if weights == 'bf16-only' else model
        model = model.transpose_wide_weights() if weights == 'float32-cols' else model
        kv = getattr(torch, auto_kv_dtype(device.split(':')[0], act))
        tok_s, model_compiled = {}, weights.endswith('compiled')
        if model_compiled:
            model = torch.compile(model, dynamic=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                generate(model, [1], 8, strategy='greedy', kv_dtype=kv)
            floor['compile_s'] = time.perf_counter() - t0
        with torch.no_grad():
            # the memory-bandwidth floor: a decode step reads every weight once; reading them (a sum) takes
            tensors = [*model.parameters(), *model.buffers()]  # int8: + the fp32 embedding table (one row is read)
            read_ms = min(timeit(lambda: [t.sum() for t in tensors], iters=1) for _ in range(5))
            floor[f'{weights}_weights_read_ms'] = read_ms
            floor[f'{weights}_tok_s_ceiling'] = 1000 / read_ms  # with free attention and no overhead
            if weights == 'float32':  # bf16 prompts are matrix-matrix: ~100x slower on CPUs without bf16 units
                Ls = np.unique(np.linspace(1, n_new, 9).round().astype(int))
                x = torch.randint(0, kw['vocab_size'], (1, n_new), device=device)
                model(x[:, :Ls[-1]])  # warm-up
                step_ms = [timeit(lambda: model(x[:, :L]), iters=1) for L in Ls]
                total_ms = float(np.interp(np.arange(1, n_new + 1), Ls, step_ms).sum())
                tok_s['none'] = 1000 * n_new / total_ms
                rows.append(dict(weights=weights, kv_cache='none (estimated)', strategy='greedy', new_tokens=n_new,
                                 tok_s=tok_s['none'], ms_per_token=total_ms / n_new))
            for cache, strategy in runs if weights in ('float32', 'bfloat16') else runs[:1 if model_compiled else 2]:
                ms = decode_ms(model, [1], n_new, strategy, warmup=8, amp=False, top_k=50,
                               kv_cache=cache.split('+')[0], offload=cache.endswith('offload'), page_size=256,
                               kv_dtype=kv)
                tok_s[cache, strategy] = 1000 * n_new / ms  # beam: positions per second (4 rows each)
                rows.append(dict(weights=weights, kv_cache=cache, strategy=strategy, new_tokens=n_new,
                                 tok_s=tok_s[cache, strategy], ms_per_token=ms / n_new))
        greedy = tok_s['contiguous', 'greedy']
        targets.append(dict(weights=weights, kv_dtype=str(kv).removeprefix('torch.'), cached_tok_s=greedy,
                            vs_fp32=greedy / targets[0]['cached_tok_s'] if targets else 1.0, target_300=greedy >= 300))
        if ('contiguous', 'beam4') in tok_s:
            beam_cost = greedy / tok_s['contiguous', 'beam4']
            targets[-1].update(beam4_cost_vs_greedy=beam_cost, target_beam_2_5x=beam_cost <= 2.5)
        if 'none' in tok_s:
            targets[-1].update(vs_none=greedy / tok_s['none'], target_60x=greedy / tok_s['none'] >= 60)
    weights_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    return dict(config=dict(**kw, pos_emb='rope', batch=1, prompt=1, new_tokens=n_new, page_size=256,
                            fp32_weights_mb=weights_mb, **floor,
                            note='beam4 tok/s = positions per second (4 beams each); none is estimated'),
                rows=rows, tables={TARGETS_TITLE: targets})


# 5. KV-cache memory vs context length: contiguous, paged, paged + offload of old blocks to CPU memory
def cache_accounting(model, cache, L):
    """cache.nbytes() against REFERENCE §11.1: kv_bytes_per_token x the token slots the cache allocated."""
    per_token = model.kv_bytes_per_token(cache.dtype or getattr(torch, dtype))
    if isinstance(cache, ContiguousKVCache):
        slots, host = cache.batch_size * cache.max_len, 0  # preallocated rows
    else:
        s = cache.stats()  # a pool of blocks shared by all rows, plus blocks offloaded to host memory
        slots, host = (s['total'] + s['host']) * s['page_size'], s['host'] * s['page_size'] * per_token
    n = cache.nbytes()
    return dict(cache_mb=n / 2**20, device_cache_mb=(n - host) / 2**20, host_cache_mb=host / 2**20,
                formula_bytes_per_token=per_token, measured_bytes_per_token=n / L,
                formula_bytes=per_token * slots, nbytes=n, formula_ok=n == per_token * slots)


def kv_point(L, kind, chunk, page, n_layer, n_head, n_embd):
    model = tiny_gpt(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=256, block_size=L, pos_emb='rope').eval()
    idx = torch.randint(256, (1, L), device=device)

    def run(n=L):
        cache = model.make_kv_cache(1, L, kind=kind.split('+')[0], page_size=page, offload='offload' in kind,
                                    dtype=getattr(torch, dtype))
        with torch.no_grad(), autocast():
            for i in range(0, n, chunk):  # chunked prefill keeps the transient attention memory small
                model(idx[:, i:i + chunk], kv_cache=cache)
        return cache_accounting(model, cache, L)
    run(chunk)  # a short warm-up (measure's full one would double the time)
    return run


def kvcache():
    lens = size([64, 128], [1024 * 2**i for i in range(4)], [1024 * 2**i for i in range(6)])  # to 8k CPU, 32k GPU
    kw = size(dict(chunk=32, page=16, n_layer=2, n_head=2, n_embd=32), dict(chunk=256, page=256, n_layer=4, n_head=4,
              n_embd=256), dict(chunk=1024, page=256, n_layer=12, n_head=12, n_embd=768))
    rows = [dict(kind=k, context=L, **measure(kv_point, fresh=True, iters=1, warmup=False, L=L, kind=k, **kw))
            for k in ('contiguous', 'paged', 'paged+offload') for L in lens]
    for r in rows:
        r['prefill_ms'] = r.pop('ms')
    return dict(config=dict(**kw, batch=1, note='offload keeps the 2 newest blocks of a row on the device; '
                            'on CPU both copies live in RAM'), rows=rows)


# 6. train step: ms/batch, tokens/s and MFU against model.peak_flops (the one train.py uses too)
def train_point(model_args, B, T, stock=False):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args)).to(device).train()
    # fused: train.py's optimizer; the stock baseline keeps nanoGPT's, foreach on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda() or not stock)
    x = torch.randint(model.config.vocab_size, (B, T + 1), device=device)

    def run():
        model_module.FAST_CPU_DROPOUT = not stock
        try:
            optimizer_step(model, opt, x)
        finally:
            model_module.FAST_CPU_DROPOUT = True
        return dict(params=model.num_params(), flops_per_token=model.flops_per_token(T))
    return run


def train_step():
    """The training dtype train.py's dtype='auto' picks (model.training_dtype; --dtype overrides it) against the
    same step in plain fp32 eager mode with PyTorch's stock kernels, the nanoGPT-equivalent, as a ratio measured in
    this one run. --train_dropout=0.2 measures nanoGPT's baby-GPT setting."""
    global dtype
    B, T = size((2, 32), (8, 256), (8, 1024))
    args = size(dict(n_layer=2, n_head=2, n_embd=32, vocab_size=256), dict(n_layer=4, n_head=4, n_embd=256,
                vocab_size=4096), dict(n_layer=12, n_head=12, n_embd=768))
    args.update(block_size=T, bias=False, dropout=train_dropout)
    chosen = dtype
    trained_in = training_dtype(device.split(':')[0]) if _dtype_auto else dtype
    # on CPU the baseline also keeps PyTorch's stock dropout/attention kernels and glibc's malloc as it is (train.py
    # keeps freed memory: model.keep_freed_cpu_memory); on CUDA ours differ from it only in the dtype
    stock = not cuda()
    try:
        # in-process: the fresh child's MALLOC_MMAP_THRESHOLD_ (exact RSS) maps every large temporary anew, which
        # doubled this step's time on CPU. The baseline goes first: the malloc setting cannot be fully undone.
        dtype = 'float32'
        fp32 = measure(train_point, fresh=False, model_args=args, B=B, T=T, stock=True) \
            if stock or trained_in != 'float32' else None
        dtype = trained_in
        if stock:
            keep_freed_cpu_memory()
        r = measure(train_point, fresh=False, model_args=args, B=B, T=T)
        fp32 = fp32 or r
    finally:
        dtype = chosen
        if stock:
            keep_freed_cpu_memory(False)
    peak = {k: peak_flops(device, k, quick=quick) for k in ('float32', 'bfloat16')}
    tok_s = B * T / (r['ms'] / 1000)
    mfu = {k: 100 * r['flops_per_token'] * tok_s / p for k, p in peak.items()}
    row = dict(dtype=trained_in, batch=B, T=T, ms_per_batch=r['ms'], fp32_eager_ms=fp32['ms'],
               speedup_vs_fp32_eager=fp32['ms'] / r['ms'], tok_s=tok_s, params=r['params'],
               flops_per_token=r['flops_per_token'], peak_mb=r['peak_mb'], delta_mb=r['delta_mb'],
               matmul_tflops_fp32=peak['float32'] / 1e12, matmul_tflops_bf16=peak['bfloat16'] / 1e12,
               mfu_pct=mfu['float32' if trained_in == 'float32' else 'bfloat16'],
               mfu_vs_fp32_pct=mfu['float32'], mfu_vs_bf16_pct=mfu['bfloat16'])
    maybe_profile('train', train_point(args, B, T))
    return dict(config=dict(model=args, optimizer='AdamW', dtype=trained_in, mfu='6N + 12LHQT (no causal halving), '
                            'mfu_pct against model.peak_flops of the training dtype (spec sheet on known GPUs, '
                            'else measured)', memory='in-process (timing scenario)'), rows=[row])


# 7. long context: perplexity by position bucket beyond the training length; needle in a haystack
def text_source():
    d = data_dir or os.path.join(_HERE, 'data', 'shakespeare_char')
    if data_dir and not os.path.isfile(os.path.join(d, 'meta.json')):
        die(f"no dataset at {d} (meta.json missing): run python prepare.py NAME, or pass --data_dir=data/NAME")
    return d if os.path.isfile(os.path.join(d, 'meta.json')) else 'synthetic words'


def text_tokens(split):
    """(tokens int64, vocab_size) of data_dir, else data/shakespeare_char if prepared, else synthetic words."""
    d = text_source()
    if d != 'synthetic words':
        with open(os.path.join(d, 'meta.json')) as f:
            meta = json.load(f)
        return np.fromfile(os.path.join(d, f'{split}.bin'), dtype=meta['dtype']).astype(np.int64), meta['vocab_size']
    rng = np.random.default_rng(0 if split == 'train' else 1)  # 200 "words" of 2-7 letters, Zipf-distributed
    words = [rng.integers(0, 26, rng.integers(2, 8)).tolist() + [26] for _ in range(200)]
    return np.array([t for i in np.minimum(rng.zipf(1.3, 60_000), 200) - 1 for t in words[i]]), 27


def train_tiny(pos_emb, text, V, T, steps):
    """A 2-layer model trained at context T on text with needles: marker V then a value (ids V+1.., used
    nowhere else) written at 16 random places of each window, so every repeat is predictable by looking back.
    Returns (model, median ms per training batch of 8)."""
    model = tiny_gpt(n_layer=2, n_head=4, n_embd=64, vocab_size=V + 1 + _N_VALUES, block_size=T, pos_emb=pos_emb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g, times = torch.Generator().manual_seed(seed), []
    for it in range(steps):
        ix = torch.randint(len(text) - T - 1, (8,), generator=g).tolist()
        x = torch.stack([torch.from_numpy(text[i:i + T + 1]) for i in ix])
        for row in x:
            p = 2 * torch.randperm(T // 2, generator=g)[:16]
            row[p], row[p + 1] = V, V + 1 + torch.randint(_N_VALUES, (1,), generator=g)
        x = x.to(device)
        opt.param_groups[0]['lr'] = 1e-2 * min(1.0, (it + 1) / 50)  # linear warm-up
        sync()
        t = time.perf_counter()
        loss = optimizer_step(model, opt, x)
        times.append(1000 * (time.perf_counter() - t))
    print(f"  trained {pos_emb} at T={T}: {steps} steps, final loss {loss:.3f}")
    return model.eval(), statistics.median(times[len(times) // 2:])


@torch.no_grad()
def token_nll(model, idx, chunk=1024):
    """NLL of every token given all tokens before it: one full-context pass (no sliding stride, REFERENCE §13)
    run as a chunked prefill through a KV cache so attention scores stay (chunk, S). Returns (B, T-1)."""
    cache, nll = model.make_kv_cache(idx.size(0), idx.size(1)), []
    for i in range(0, idx.size(1) - 1, chunk):
        x, y = idx[:, i:min(i + chunk, idx.size(1) - 1)], idx[:, i + 1:i + 1 + chunk]
        with autocast():
            logits = model(x, kv_cache=cache)[0]
        nll.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction='none'))
    return torch.cat(nll, dim=1)


def ppl_by_bucket(nll, edges):
    """PPL_b = exp(mean NLL) of the targets at positions t in [lo, hi), token-weighted over the sequences."""
    t = torch.arange(1, nll.size(1) + 1)
    return {f'ppl[{lo},{hi})': math.exp(nll[:, (t >= lo) & (t < hi)].mean().item())
            for lo, hi in zip(edges, edges[1:]) if lo < nll.size(1)}


@torch.no_grad()
def needle_recall(model, filler, needles, lengths, depths):
    """Needle in a haystack (gkamradt-style, at token level): each needle (tokens, query, answer) goes at
    int(depth x room) of L tokens of filler, the query at the end; a hit = the greedy continuation equals the
    answer. distance = query start - needle start. Returns one dict per trial."""
    trials = []
    for L in lengths:
        for d in depths:
            seqs = []
            for j, (needle, query, _) in enumerate(needles):
                room = L - len(needle) - len(query)
                hay = filler[(j * 7919 + L) % (len(filler) - room):][:room].tolist()
                seqs.append(hay[:int(d * room)] + needle + hay[int(d * room):] + query)
            x = torch.tensor(seqs, device=device)
            for _ in needles[0][2]:
                with autocast():
                    x = torch.cat([x, model(x)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
            trials += [dict(length=L, depth=d, distance=L - len(q) - int(d * (L - len(n) - len(q))),
                            hit=x[j, L:].tolist() == a) for j, (n, q, a) in enumerate(needles)]
    return trials


def recall_by_distance(trials, edges, z=1.96):
    """Hit rate per distance bucket with n and the 95% Wilson score interval."""
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        hits = [t['hit'] for t in trials if lo <= t['distance'] < hi]
        if hits:
            n, p = len(hits), sum(hits) / len(hits)
            den = 1 + z * z / n
            c, w = (p + z * z / (2 * n)) / den, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
            rows.append(dict(distance=f'[{lo},{hi})', n=n, recall=p, ci95=[max(0.0, c - w), min(1.0, c + w)]))
    return rows


def attention_by_distance(model, x):
    """Average attention mass per layer by query-key distance on one window; saves the maps for the plots."""
    with torch.no_grad():
        model(x, return_attn=True)
    maps = torch.stack([a[0] for a in model.last_attn]).float().cpu()  # (layers, heads, W, W)
    np.save(os.path.join(out, 'attn_maps.npy'), maps.numpy())
    dist, bins = torch.arange(x.size(1))[:, None] - torch.arange(x.size(1))[None, :], [0, 1, 2, 4, 8, 16, 32, 64]
    return [dict(layer=i, **{f'd[{lo},{hi})': m[..., (dist >= lo) & (dist < hi)].sum().item() / m[..., 0].numel()
                             for lo, hi in zip(bins, bins[1:])}) for i, m in enumerate(maps)]


def decode_point(state_path, model_args, kv_cache, prompt, n_new):
    model = GPT(GPTConfig(**model_args)).to(device).eval()
    model.load_state_dict(torch.load(state_path, map_location=device, weights_only=True))

    def run():
        with autocast():
            generate(model, prompt, n_new, strategy='greedy', kv_cache=kv_cache, page_size=256)
    return run


def long_context_models(T, steps):
    """{pos_emb: (model, ms per training batch of 8)}, needles, val tokens. --ckpt: the user's model; needle = a
    12-token snippet of val, query = its first 8 tokens, answer = the next 4. Else tiny models trained here;
    needle = marker + value, query = marker, answer = value."""
    global data_dir
    if ckpt:
        model, ck = load_checkpoint(ckpt, model_overrides(globals()))
        cfg = ck.get('config', {})
        data_dir = data_dir or cfg.get('data_dir') or os.path.join(_HERE, 'data', cfg.get('dataset', ''))
        val, rng = text_tokens('val')[0], torch.Generator().manual_seed(seed)
        snips = [val[i:i + 12].tolist() for i in torch.randint(len(val) - 12, (8,), generator=rng).tolist()]
        ms_batch = measure(train_point, model_args=model.config.__dict__, B=8, T=model.config.block_size)['ms']
        return {model.config.pos_emb: (model.to(device).eval(), ms_batch)}, [(s, s[:8], s[8:]) for s in snips], val
    text, V = text_tokens('train')
    models = {p: train_tiny(p, text, V, T, steps) for p in ('sinusoidal', 'rope', 'alibi')}
    return models, [([V, V + 1 + j], [V], [V + 1 + j]) for j in range(8)], text_tokens('val')[0]


def long_context():
    T, steps, n_eval = size((32, 20, 128), (128, 400, 8192), (256, 1000, 32768))
    models, needles, val = long_context_models(T, steps)
    first = next(iter(models.values()))[0]
    T = first.config.block_size
    max_len = T if first.config.pos_emb == 'learned' else 10**9  # learned positions stop at block_size
    n_eval = min(eval_len or n_eval, max_len)  # eval_len: the config key
    if n_eval >= len(val):
        die(f"eval_len={n_eval} needs more than the {len(val)} val tokens of {text_source()}")
    edges = sorted({0, T} | {e for e in (n_eval // 8, n_eval // 2, n_eval) if e > T})  # 0,128,1k,4k,8k
    variants = [(p, m) for p, (m, _) in models.items()]
    if 'rope' in models:  # the same weights under each context-extension scaling (REFERENCE §2.4)
        for s in ('linear', 'ntk', 'yarn', 'dynamic'):
            v = GPT(GPTConfig(**{**models['rope'][0].config.__dict__, 'rope_scaling': s, 'rope_factor': n_eval / T}))
            v.load_state_dict(models['rope'][0].state_dict())
            variants.append((f'rope {s} x{n_eval / T:g}', v.to(device).eval()))
    starts = torch.randint(len(val) - n_eval, (size(1, 2, 4),), generator=torch.Generator().manual_seed(seed))
    seqs = torch.stack([torch.from_numpy(val[i:i + n_eval]) for i in starts.tolist()]).to(device)
    lengths = [L for L in (T // 4, T // 2, T, 2 * T, 4 * T, 8 * T, 16 * T)
               if sum(map(len, needles[0][:2])) + 4 <= L <= min(16 * T, n_eval - 4)]
    rows, recall = [], []
    for name, model in variants:
        trials = needle_recall(model, val, needles, lengths, [0.0, 0.25, 0.5, 0.75, 1.0])
        # a streaming model token by token, as it decodes: its cache puts positions inside the window, where a
        # long chunk would put the sinks at their absolute distance
        nll = token_nll(model, seqs, chunk=1 if model.config.sliding_window else 1024)
        ppl = ppl_by_bucket(nll, edges)  # edges start 0, T: the first bucket is the train context
        rows.append(dict(variant=name, train_len=T, ppl_train_ctx=ppl[f'ppl[0,{T})'], **ppl,
                         needle_recall=sum(t['hit'] for t in trials) / max(1, len(trials))))
        recall += [dict(variant=name, **r)
                   for r in recall_by_distance(trials, [0, T // 2, T, 2 * T, 4 * T, 8 * T, 16 * T + 1])]
    maybe_profile('long_context', lambda: token_nll(first, seqs[:1, :1024]))
    # the course table: PPL at the training context, greedy decoding tok/s + peak memory, ms per batch of 8
    table = [('sinusoidal, no cache', 'sinusoidal', 'none'), ('RoPE + contiguous cache', 'rope', 'contiguous'),
             ('ALiBi + paged cache (256)', 'alibi', 'paged')]
    if ckpt:
        p = first.config.pos_emb
        table = [(f'{p} (ckpt), {c} cache', p, c) for c in ('none', 'contiguous', 'paged')]
    n_new, course = min(size(16, 256, 1024), max_len - 16), []
    for label, p, cache in table:
        model, ms_batch = models[p]
        path = os.path.join(out, f'_state_{p}.pt')
        torch.save(model.state_dict(), path)
        r = measure(decode_point, iters=1, state_path=path, model_args=model.config.__dict__, kv_cache=cache,
                    prompt=val[:16].tolist(), n_new=n_new)
        os.remove(path)
        course.append({'Config': label, 'PPL': next(row for row in rows if row['variant'] == p)['ppl_train_ctx'],
                       'Tokens/s': 1000 * n_new / r['ms'], 'Peak mem': r['peak_mb'], 'decode_delta_mb': r['delta_mb'],
                       'ms/batch': ms_batch})
    return dict(config=dict(ckpt=ckpt or None, overrides=model_overrides(globals()), data=text_source(),
                            train_len=T, train_steps=0 if ckpt else steps, eval_len=n_eval, rope_factor=n_eval / T,
                            model='ckpt' if ckpt else dict(n_layer=2, n_head=4, n_embd=64),
                            course_table=f'PPL over positions [0, {T}) of val; Tokens/s: greedy, batch 1, {n_new} new '
                                         'tokens; Peak mem of that decoding; ms/batch: train step at batch 8'),
                rows=rows, course_table=course, tables={
                    'needle recall by distance': recall,
                    'attention mass by distance (RoPE or ckpt model)':
                        attention_by_distance(models.get('rope', (first,))[0], seqs[:1, :64])})


# =============================================================================
# output: results.json, results.md, plots

SCENARIOS = dict(attention=attention, mhsa=mhsa, ffn=ffn, decoding=decoding, kvcache=kvcache, train=train_step,
                 long_context=long_context, decode_target=decode_target)
OPT_IN = {'decode_target'}  # long: run only when named


def fmt(v):
    return f'{v:.4g}' if isinstance(v, float) else ' '.join(map(fmt, v)) if isinstance(v, list) else str(v)


def md_table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return '\n'.join(['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)] +
                     ['| ' + ' | '.join(fmt(r.get(c, '')) for c in cols) + ' |' for r in rows])


def course_table(rows):
    return '\n'.join(['| Config | PPL | Tokens/s | Peak mem | ms/batch |', '|---|---|---|---|---|'] +
                     [f"| {r['Config']} | {r['PPL']:.3f} | {r['Tokens/s']:.1f} | {r['Peak mem']:.0f} MiB "
                      f"(+{r['decode_delta_mb']:.1f}) | {r['ms/batch']:.1f} |" for r in rows])


def scenario_md(name, res):
    md = [f"## {name} ({res['wall_s']:.0f} s)", f"config: `{json.dumps(res['config'])}`", '', md_table(res['rows'])]
    for title, rows in res.get('tables', {}).items():
        md += ['', f'### {title}', '', md_table(rows)]
    return '\n'.join(md)


def to_markdown(results):
    m, lc = results['meta'], results['scenarios'].get('long_context')
    md = ['# Benchmark results', '', f"{m['device']} ({m['device_name']}), {m['dtype']}, torch {m['torch']}, "
          f"{m['threads']} threads, quick={m['quick']}. Memory in MiB: peak RSS of a fresh process per point on CPU, "
          "max_memory_allocated on GPU; delta = peak minus the memory after set-up.", '']
    if lc:
        md += ['## Course table', '', lc['config']['course_table'] + ' (+ its delta).', '',
               course_table(lc['course_table']), '']
    return '\n'.join(md + [scenario_md(n, r) + '\n' for n, r in results['scenarios'].items()])


def pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")


def save_fig(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_plots(results, out_dir):
    """Decoding speed bars, memory vs context, expert load, latency vs PPL, attention by distance + head maps."""
    plt, S, drawn = pyplot(), results['scenarios'], []
    if plt is None:
        return drawn

    def save(fig, name):
        save_fig(plt, fig, os.path.join(out_dir, name))
        drawn.append(name)
    if 'decoding' in S:
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = S['decoding']['rows']
        ax.bar([f"{r['strategy']}\n{r['kv_cache']}" for r in rows], [r['tok_s'] for r in rows],
               color=['C0', 'C1', 'C2'] * 3)
        ax.set(ylabel='tokens/s', title='decoding speed, batch 1')
        save(fig, 'decoding.png')
    if 'kvcache' in S:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, kind in enumerate(dict.fromkeys(r['kind'] for r in S['kvcache']['rows'])):
            rows = [r for r in S['kvcache']['rows'] if r['kind'] == kind]
            ctx = [r['context'] for r in rows]
            ax.plot(ctx, [r['delta_mb'] for r in rows], 'o-', color=f'C{i}', label=f'{kind}: peak delta')
            ax.plot(ctx, [r['device_cache_mb'] for r in rows], 'x--', color=f'C{i}', label=f'{kind}: cache on device')
        ax.set(xlabel='context length', ylabel='MiB', xscale='log', title='KV-cache memory vs context')
        ax.legend(fontsize=7)
        save(fig, 'kvcache_memory.png')
    moe = [r for r in S.get('ffn', {}).get('rows', []) if 'expert_load_pct' in r]
    if moe:
        fig, axes = plt.subplots(1, len(moe), figsize=(5 * len(moe), 3.5), squeeze=False)
        for ax, r in zip(axes[0], moe):
            ax.bar(range(len(r['expert_load_pct'])), r['expert_load_pct'])
            ax.set(xlabel='expert', ylabel='% of routed assignments', title=r['variant'])
        save(fig, 'expert_load.png')
    if 'long_context' in S:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in S['long_context']['course_table']:
            ax.scatter(1000 / r['Tokens/s'], r['PPL'])
            ax.annotate(r['Config'], (1000 / r['Tokens/s'], r['PPL']), fontsize=7)
        ax.set(xlabel='ms per decoded token', ylabel='PPL', title='latency vs perplexity')
        save(fig, 'latency_vs_ppl.png')
        maps = np.load(os.path.join(out_dir, 'attn_maps.npy'))  # (layers, heads, W, W)
        L, H = maps.shape[:2]
        fig, axes = plt.subplots(L, H + 1, figsize=(2.4 * H + 3, 2.4 * L), squeeze=False)
        for layer, row in enumerate(S['long_context']['tables']['attention mass by distance (RoPE or ckpt model)']):
            bins = [k for k in row if k != 'layer']
            axes[layer][0].bar([b[1:] for b in bins], [row[b] for b in bins])
            axes[layer][0].set_title(f'layer {layer}: mass by distance', fontsize=8)
            axes[layer][0].tick_params(labelsize=6)
            for h in range(H):
                axes[layer][h + 1].imshow(maps[layer, h])
                axes[layer][h + 1].set(title=f'layer {layer} head {h}', xticks=[], yticks=[])
        save(fig, 'attention.png')
    return drawn


def load_runs(dirs):
    """{group: [records of each run's log.jsonl]}: runs named alike but for a -seedN / _seedN suffix form one
    group, and so do the run subdirectories of a directory without a log.jsonl of its own."""
    groups = {}
    for d in dirs:
        runs = [d] if os.path.isfile(os.path.join(d, 'log.jsonl')) else sorted(
            os.path.join(d, s) for s in os.listdir(d) if os.path.isfile(os.path.join(d, s, 'log.jsonl')))
        if not runs:
            die(f"no log.jsonl in {d} nor in its subdirectories: pass train.py out_dirs")
        group = groups.setdefault(re.sub(r'[-_]seed\d+$', '', os.path.basename(os.path.normpath(d))), [])
        for r in runs:
            with open(os.path.join(r, 'log.jsonl')) as f:
                group.append([json.loads(line) for line in f if line.strip()])
    return groups


def curve(group, key):
    """(iters, mean, std) of `key` over the runs of a group, at the iterations every run logged."""
    per_run = [{r['iter']: r[key] for r in run if r.get(key) is not None} for run in group]
    iters = sorted(set.intersection(*(set(p) for p in per_run)))
    vals = np.array([[p[i] for i in iters] for p in per_run]).reshape(len(per_run), len(iters))
    return iters, vals.mean(0), vals.std(0)


def plot_runs(dirs, out_dir):
    groups = load_runs(dirs)
    for name, g in groups.items():
        it, mean, std = curve(g, 'val_loss')
        if it:
            print(f"{name}: {len(g)} run(s), final val loss {mean[-1]:.4f} +- {std[-1]:.4f} at iter {it[-1]}")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, (name, g) in enumerate(groups.items()):
        for key, style in (('loss', ':'), ('train_loss', '--'), ('val_loss', '-')):
            it, mean, std = curve(g, key)
            if it:
                seeds = f' ({len(g)} seeds)' if len(g) > 1 else ''
                ax.plot(it, mean, style, color=f'C{n}', label=f'{name} {key}{seeds}')
                ax.fill_between(it, mean - std, mean + std, color=f'C{n}', alpha=0.2)
    ax.set(xlabel='iteration', ylabel='loss', title='training curves (mean +- std over seeds)')
    ax.legend(fontsize=7)
    os.makedirs(out_dir, exist_ok=True)
    save_fig(plt, fig, os.path.join(out_dir, 'loss_curves.png'))
    print(f"wrote {os.path.join(out_dir, 'loss_curves.png')}")


_dtype_auto = False


def main(argv=None):
    global device, dtype, _dtype_auto
    argv = list(sys.argv[1:] if argv is None else argv)
    plot_dirs = []
    if '--plot' in argv:  # --plot DIR [DIR ...]: directories, not config keys
        i = argv.index('--plot')
        plot_dirs = [a for a in argv[i + 1:] if not a.startswith('--')]
        argv = argv[:i] + [a for a in argv[i + 1:] if a.startswith('--')]
        if not plot_dirs:
            die("--plot needs run directories: python bench.py --plot out-a out-b")
    reject_shape_flags(argv, 'bench.py')
    configure(globals(), argv)
    check_ranges(globals(), [('eval_len', eval_len >= 0, ">= 0 (0 = the scenario's default)"),
                             ('train_dropout', 0 <= train_dropout < 1, 'in [0, 1)')])
    if model_overrides(globals()) and not ckpt:
        die("the inference overrides (rope_scaling, sliding_window, ...) apply to --ckpt=PATH only")
    if plot_dirs:
        return plot_runs(plot_dirs, out)
    names = [n for n in SCENARIOS if n not in OPT_IN] if scenario == 'all' else \
        [s.strip() for s in scenario.split(',') if s.strip()]
    if not names or any(n not in SCENARIOS for n in names):
        die(f"unknown scenario in '{scenario}': choose from {', '.join(SCENARIOS)} (comma-separated) or all")
    if ckpt and not os.path.isfile(ckpt):
        die(f"no checkpoint at {ckpt}: train one with train.py, or leave --ckpt empty to train tiny models here")
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    _dtype_auto = dtype == 'auto'  # the train scenario then trains as train.py would (model.training_dtype)
    dtype = ('bfloat16' if cuda() and torch.cuda.is_bf16_supported() else 'float32') if dtype == 'auto' else dtype
    if threads > 0:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    meta = dict(device=device, dtype=dtype, torch=torch.__version__, python=platform.python_version(),
                device_name=torch.cuda.get_device_name() if cuda() else platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), quick=quick, argv=sys.argv[1:],
                date=time.strftime('%Y-%m-%d %H:%M:%S'))
    print(f"bench: {', '.join(names)} on {device} ({meta['device_name']}), {dtype}, torch {torch.__version__}")
    results, t0 = dict(meta=meta, scenarios={}), time.time()
    for name in names:
        t = time.time()
        results['scenarios'][name] = res = SCENARIOS[name]()
        res['wall_s'] = time.time() - t
        print(scenario_md(name, res) + '\n', flush=True)
    meta['wall_s'] = time.time() - t0
    save_json(results, os.path.join(out, 'results.json'))
    drawn = make_plots(results, out)
    with open(os.path.join(out, 'results.md.tmp'), 'w') as f:
        f.write(to_markdown(results) + ''.join(f'\n![{p[:-4]}]({p})\n' for p in drawn or ()))
    os.replace(os.path.join(out, 'results.md.tmp'), os.path.join(out, 'results.md'))
    if 'long_context' in results['scenarios']:
        print(course_table(results['scenarios']['long_context']['course_table']))
    print(f"wrote {out}/results.json and {out}/results.md in {meta['wall_s']:.0f} s")


if __name__ == '__main__':
    main()
