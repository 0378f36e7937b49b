import re, sys, collections
pids = {}
for line in open(sys.argv[1]):
    p = line.strip().split('|')
    if len(p) == 2: pids[p[0]] = p[1]
want = sys.argv[3] if len(sys.argv) > 3 else 'projector'
agg = collections.defaultdict(lambda: [0, 0.0])
rx = re.compile(r'\[(\d+)\] \S+ LOG:  duration: ([\d.]+) ms  (parse|bind|execute|statement)( [^:]*)?: (.*)')
for line in open(sys.argv[2], errors='replace'):
    m = rx.search(line)
    if not m: continue
    pid, ms, phase, _, text = m.groups()
    if not pids.get(pid, '').startswith(want): continue
    key = (phase, re.sub(r'\s+', ' ', text)[:110])
    agg[key][0] += 1; agg[key][1] += float(ms)
tot = sum(v[1] for v in agg.values())
print('total ms', round(tot, 1), 'count', sum(v[0] for v in agg.values()))
for (phase, text), (n, ms) in sorted(agg.items(), key=lambda x: -x[1][1])[:40]:
    print(f'{ms:8.1f} {100*ms/tot:5.1f}% n={n:5d} avg={ms/n:6.3f} {phase:8s} {text}')
