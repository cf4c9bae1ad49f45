//! Expert placement: which node computes each (layer, expert). Pure functions, no I/O.
//!
//! Objective (DESIGN.md, "Placement and failure"): minimise the slowest node's per-layer time
//! under memory limits. Without activation statistics every expert is equally likely, so each
//! layer's experts are split across nodes in proportion to their measured GEMV throughput
//! (largest-remainder rounding), capped by what each node's memory budget holds; the same split
//! is used on every layer so no layer waits on an overloaded node. Node 0 is the coordinator,
//! which keeps the whole file mapped and so has no cap.
//!
//! A placement file may also give an expert several holders (`w1+w2`: replicas). Each forward
//! call then sends a replicated expert's rows to one of its holders, chosen by
//! [`Placement::dispatch`] from the call's routes alone so that every holder gets a near-equal
//! number of token rows: with experts split, a token's top-k lands unevenly on the nodes (for 8 of
//! 64 experts over two nodes, the busier node gets 5.02 of them on average), with replicas each
//! node gets 4.

use std::collections::BTreeMap;
use std::fmt;

/// A node that can compute experts.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSpec {
    /// Name used in `--placement` files and stats (`local` for the coordinator).
    pub name: String,
    /// Bytes of expert weights it may hold (`u64::MAX`: unlimited).
    pub mem_budget: u64,
    /// Measured quantized GEMV throughput, GB/s of weights read.
    pub gemv_gbps: f32,
}

/// Errors of placement.
#[derive(Debug, PartialEq, Eq)]
pub enum PlacementError {
    /// A line of a placement file could not be parsed.
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The nodes cannot hold every expert.
    NoRoom,
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementError::Syntax { line, message } => write!(f, "placement line {line}: {message}"),
            PlacementError::NoRoom => f.write_str("the nodes' memory budgets cannot hold every expert"),
        }
    }
}

impl std::error::Error for PlacementError {}

/// The holders of every (layer, expert): indices into the node list (0 = the coordinator), one or
/// more per expert, in the order the placement names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    n_layer: usize,
    n_expert: usize,
    holders: Vec<Vec<usize>>,
}

impl Placement {
    /// Every expert on node 0.
    pub fn all_local(n_layer: usize, n_expert: usize) -> Placement {
        Placement { n_layer, n_expert, holders: vec![vec![0]; n_layer * n_expert] }
    }

    /// Splits each layer's `n_expert` experts across `nodes` in proportion to `gemv_gbps`,
    /// capped by `mem_budget / (n_layer * expert_bytes)` experts per layer (node 0 uncapped).
    /// Node `i` gets a contiguous run of expert ids, nodes in order.
    pub fn proportional(n_layer: usize, n_expert: usize, expert_bytes: u64, nodes: &[NodeSpec]) -> Placement {
        assert!(!nodes.is_empty(), "node 0 is the coordinator");
        let cap: Vec<usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if i == 0 {
                    n_expert
                } else {
                    let per_layer = n.mem_budget / expert_bytes.max(1) / n_layer.max(1) as u64;
                    per_layer.min(n_expert as u64) as usize
                }
            })
            .collect();
        let weights: Vec<f64> = nodes.iter().map(|n| speed_class(n.gemv_gbps)).collect();
        let counts = split(n_expert, &weights, &cap);
        let mut owner = Vec::with_capacity(n_layer * n_expert);
        for _ in 0..n_layer {
            for (node, &c) in counts.iter().enumerate() {
                owner.extend(std::iter::repeat_n(node, c));
            }
        }
        let holders = owner.into_iter().map(|node| vec![node]).collect();
        Placement { n_layer, n_expert, holders }
    }

    /// Parses a placement file: one rule per line, `LAYERS EXPERTS NODES`, where LAYERS and
    /// EXPERTS are `*`, a number, a range `A-B` (inclusive) or a comma list of those, and NODES is
    /// a comma list of holder groups over which each layer's selected experts are split in
    /// contiguous, near-equal runs (`* * w1,w2`: half each). A group is a node name from
    /// `node_names` (index = node) or several joined by `+`, each of which then holds every expert
    /// of the group's run (`* * w1+w2`: both hold all, [`Placement::dispatch`] balances each call
    /// between them). Later lines override earlier ones; experts no line names stay on node 0. `#`
    /// starts a comment.
    pub fn parse(
        text: &str,
        n_layer: usize,
        n_expert: usize,
        node_names: &[String],
    ) -> Result<Placement, PlacementError> {
        let mut p = Placement::all_local(n_layer, n_expert);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |message: String| PlacementError::Syntax { line: i + 1, message };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [layers, experts, nodes] = fields[..] else {
                return Err(err(format!("expected `LAYERS EXPERTS NODES`, found {line:?}")));
            };
            let layers = parse_set(layers, n_layer).map_err(|m| err(format!("layers: {m}")))?;
            let experts = parse_set(experts, n_expert).map_err(|m| err(format!("experts: {m}")))?;
            let mut groups = Vec::new();
            for group in nodes.split(',') {
                let mut holders = Vec::new();
                for name in group.split('+') {
                    let node = node_names
                        .iter()
                        .position(|n| n == name)
                        .ok_or_else(|| err(format!("unknown node {name:?} (known: {})", node_names.join(", "))))?;
                    if holders.contains(&node) {
                        return Err(err(format!("node {name:?} appears twice in {group:?}")));
                    }
                    holders.push(node);
                }
                groups.push(holders);
            }
            for &l in &layers {
                for (i, &e) in experts.iter().enumerate() {
                    p.holders[l * n_expert + e] = groups[i * groups.len() / experts.len()].clone();
                }
            }
        }
        Ok(p)
    }

    /// The nodes holding expert `expert` of layer `layer` (at least one).
    pub fn holders(&self, layer: usize, expert: usize) -> &[usize] {
        &self.holders[layer * self.n_expert + expert]
    }

    /// The node computing each route of one forward call of layer `layer`, given the routes'
    /// experts (`route_experts[i]` is route `i`'s). An expert with one holder goes to it. The
    /// replicated ones are taken most token rows first (then by id) and each goes whole to its
    /// holder with the fewest rows so far (ties: the first named): a function of the routes only,
    /// so the same call is split the same way whichever nodes are up.
    pub fn dispatch(&self, layer: usize, route_experts: &[u32]) -> Vec<usize> {
        let mut rows = vec![0usize; self.n_expert];
        for &e in route_experts {
            rows[e as usize] += 1;
        }
        let mut load: BTreeMap<usize, usize> = BTreeMap::new();
        let mut node_of = vec![0usize; self.n_expert];
        let mut replicated = Vec::new();
        for (e, &r) in rows.iter().enumerate().filter(|&(_, &r)| r > 0) {
            match self.holders(layer, e) {
                &[node] => {
                    node_of[e] = node;
                    *load.entry(node).or_default() += r;
                }
                _ => replicated.push((e, r)),
            }
        }
        replicated.sort_by_key(|&(e, r)| (std::cmp::Reverse(r), e));
        for (e, r) in replicated {
            let holders = self.holders(layer, e);
            let node = *holders.iter().min_by_key(|n| load.get(n).copied().unwrap_or(0)).unwrap_or(&0);
            node_of[e] = node;
            *load.entry(node).or_default() += r;
        }
        route_experts.iter().map(|&e| node_of[e as usize]).collect()
    }

    /// The (layer, expert) pairs `node` holds, layer-major.
    pub fn experts_of(&self, node: usize) -> Vec<(usize, usize)> {
        (0..self.n_layer)
            .flat_map(|l| (0..self.n_expert).map(move |e| (l, e)))
            .filter(|&(l, e)| self.holders(l, e).contains(&node))
            .collect()
    }
}

/// A measured speed rounded to a step of 2^(1/4) (about 19%), so that measurement noise does
/// not move experts between runs (a moved expert is a cache miss on its new node).
fn speed_class(gbps: f32) -> f64 {
    let g = f64::from(gbps).max(1e-3);
    2f64.powf((g.log2() * 4.0).round() / 4.0)
}

/// Largest-remainder split of `total` by `weights`, respecting `cap` (spill goes to the others).
fn split(total: usize, weights: &[f64], cap: &[usize]) -> Vec<usize> {
    let mut counts = vec![0usize; weights.len()];
    let mut open: Vec<usize> = (0..weights.len()).filter(|&i| cap[i] > 0).collect();
    let mut left = total;
    while left > 0 && !open.is_empty() {
        let sum: f64 = open.iter().map(|&i| weights[i]).sum();
        let ideal: Vec<f64> = open.iter().map(|&i| left as f64 * weights[i] / sum).collect();
        let mut give: Vec<usize> = ideal.iter().map(|x| x.floor() as usize).collect();
        // Fewer than `open.len()` units remain after the floors; the largest remainders get them.
        let rest = left - give.iter().sum::<usize>();
        let mut order: Vec<usize> = (0..open.len()).collect();
        order.sort_by(|&a, &b| (ideal[b] - ideal[b].floor()).total_cmp(&(ideal[a] - ideal[a].floor())).then(a.cmp(&b)));
        for &j in order.iter().take(rest) {
            give[j] += 1;
        }
        for (j, &i) in open.iter().enumerate() {
            let g = give[j].min(cap[i] - counts[i]);
            counts[i] += g;
            left -= g;
        }
        open.retain(|&i| counts[i] < cap[i]);
    }
    counts
}

fn parse_set(s: &str, n: usize) -> Result<Vec<usize>, String> {
    if s == "*" {
        return Ok((0..n).collect());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| format!("{part:?} is not a number or range"))?;
        let b: usize = b.parse().map_err(|_| format!("{part:?} is not a number or range"))?;
        if a > b || b >= n {
            return Err(format!("{part:?} is outside 0-{}", n - 1));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, mem: u64, gbps: f32) -> NodeSpec {
        NodeSpec { name: name.into(), mem_budget: mem, gemv_gbps: gbps }
    }

    #[test]
    fn proportional_to_speed() {
        let nodes = [node("local", u64::MAX, 10.0), node("a", u64::MAX, 20.0), node("b", u64::MAX, 10.0)];
        let p = Placement::proportional(2, 64, 1000, &nodes);
        assert_eq!(p.experts_of(0).len(), 32);
        assert_eq!(p.experts_of(1).len(), 64);
        assert_eq!(p.experts_of(2).len(), 32);
        assert_eq!(p.holders(1, 0), [0]);
        assert_eq!(p.holders(1, 16), [1]);
        assert_eq!(p.holders(1, 63), [2]);
    }

    #[test]
    fn noise_in_measured_speed_does_not_move_experts() {
        let a = [node("local", u64::MAX, 10.0), node("a", u64::MAX, 9.5)];
        let b = [node("local", u64::MAX, 10.3), node("a", u64::MAX, 9.2)];
        assert_eq!(Placement::proportional(2, 64, 1, &a), Placement::proportional(2, 64, 1, &b));
    }

    #[test]
    fn memory_caps_spill_to_others() {
        // "a" is fastest but holds only 4 experts per layer (2 layers x 4 x 100 bytes).
        let nodes = [node("local", u64::MAX, 1.0), node("a", 800, 100.0), node("b", u64::MAX, 1.0)];
        let p = Placement::proportional(2, 8, 100, &nodes);
        assert_eq!(p.experts_of(1).len(), 8);
        assert_eq!(p.experts_of(0).len() + p.experts_of(2).len(), 8);
        assert!(p.experts_of(0).len().abs_diff(p.experts_of(2).len()) <= 1);
    }

    #[test]
    fn every_expert_has_one_owner() {
        let nodes = [node("local", u64::MAX, 3.3), node("a", 5_000, 7.1), node("b", 90_000, 2.2)];
        let p = Placement::proportional(3, 64, 100, &nodes);
        let total: usize = (0..3).map(|n| p.experts_of(n).len()).sum();
        assert_eq!(total, 3 * 64);
        assert!(p.experts_of(1).len() <= 50);
    }

    #[test]
    fn parse_rules_and_errors() {
        let names = vec!["local".to_string(), "w1".to_string(), "w2".to_string()];
        let p = Placement::parse("# split\n* 0-3 w1\n* 4-7 w2\n1 0 local # back\n", 2, 8, &names).unwrap();
        assert_eq!(p.experts_of(0), vec![(1, 0)]);
        assert_eq!(p.holders(0, 0), [1]);
        assert_eq!(p.holders(1, 5), [2]);
        assert!(matches!(Placement::parse("* 0-8 w1", 2, 8, &names), Err(PlacementError::Syntax { line: 1, .. })));
        let e = Placement::parse("\n* 0 nobody", 2, 8, &names).unwrap_err();
        assert!(e.to_string().contains("line 2") && e.to_string().contains("nobody"), "{e}");
        assert!(Placement::parse("* 0", 2, 8, &names).is_err());
        let even = Placement::parse("* * w1,w2", 2, 7, &names).unwrap();
        assert_eq!(even.experts_of(1).len(), 2 * 4);
        assert_eq!(even.experts_of(2).len(), 2 * 3);
        assert_eq!((even.holders(0, 3), even.holders(0, 4)), (&[1][..], &[2][..]));
    }

    #[test]
    fn parse_replicated_groups() {
        let names = vec!["local".to_string(), "w1".to_string(), "w2".to_string()];
        let p = Placement::parse("* * w1+w2", 2, 8, &names).unwrap();
        assert_eq!(p.experts_of(1).len(), 16);
        assert_eq!(p.experts_of(2).len(), 16);
        assert!(p.experts_of(0).is_empty());
        assert_eq!(p.holders(1, 7), [1, 2]);
        let mixed = Placement::parse("* * w2+w1,local", 1, 8, &names).unwrap();
        assert_eq!((mixed.holders(0, 3), mixed.holders(0, 4)), (&[2, 1][..], &[0][..]));
        let e = Placement::parse("* * w1+w1", 1, 8, &names).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        assert!(Placement::parse("* * w1+", 1, 8, &names).is_err());
    }

    #[test]
    fn dispatch_balances_rows_over_replicas() {
        let names = vec!["local".to_string(), "w1".to_string(), "w2".to_string()];
        let p = Placement::parse("* * w1+w2", 1, 64, &names).unwrap();
        // One token's top-8: four experts to each holder.
        let decode = [3, 60, 17, 9, 41, 0, 33, 28];
        let nodes = p.dispatch(0, &decode);
        assert_eq!(nodes.iter().filter(|&&n| n == 1).count(), 4);
        assert_eq!(nodes.iter().filter(|&&n| n == 2).count(), 4);
        assert_eq!(p.dispatch(0, &decode), nodes, "a function of the routes");
        // Rows, not experts, are balanced: expert 5's six rows against the other six routes.
        let batch = [5, 5, 5, 5, 5, 5, 1, 2, 3, 4, 6, 7];
        let nodes = p.dispatch(0, &batch);
        assert!(nodes[..6].iter().all(|&n| n == nodes[0]), "an expert goes whole to one node");
        assert!(nodes[6..].iter().all(|&n| n != nodes[0]));
        // Fixed holders count towards the load the replicas are balanced against.
        let q = Placement::parse("* 0-31 w1\n* 32-63 w1+w2", 1, 64, &names).unwrap();
        let nodes = q.dispatch(0, &[0, 1, 2, 40, 41, 42]);
        assert_eq!(nodes, [1, 1, 1, 2, 2, 2]);
    }
}
