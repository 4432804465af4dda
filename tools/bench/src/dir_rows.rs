//! Runs the directory phases (rows 8-12) and the stalled shared store (row 13), and turns
//! their rounds into rows: medians, every round listed under the details.

use std::time::Duration;

use crate::dirs::{self, PageBaselines, PageLs, Walk};
use crate::error::Result;
use crate::fs::Fs;
use crate::measure::{listed, median_of, repeated};
use crate::phases::Bench;
use crate::progress;
use crate::report::{Quantity, Report, Row, Target};
use crate::shared::StallRound;
use crate::MIB;

/// orcafs's `ls -l` of one page and its baselines (medians), for the peer table.
#[derive(Debug, Clone, Copy)]
pub struct PageMedians {
    pub plain_page_ms: f64,
    pub local_ms: f64,
    pub cold_ms: f64,
    pub warm_ms: f64,
    pub warm_requests: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn med_ms<T>(v: &[T], f: impl Fn(&T) -> Duration) -> f64 {
    median_of(v.iter().map(|x| ms(f(x))))
}

fn listed_ms<T>(v: &[T], f: impl Fn(&T) -> Duration) -> String {
    listed(v.iter().map(|x| ms(f(x))))
}

/// Rows 8-12; returns the medians of row 12 for the peer table.
pub fn measure_dirs(bench: &mut Bench, report: &mut Report) -> Option<PageMedians> {
    let rounds = bench.knobs.repeat;
    let (large, (tree_dirs, per_dir), page) = bench.dir_sizes();
    progress("writing the local copy of the directories");
    if let Err(e) = bench.local_dirs() {
        report.rows.push(Row::failed(
            "8-12. Directory rows",
            &e.to_string(),
            Target::None,
        ));
        return None;
    }
    let what = format!("ls -l of {large} objects: plain LIST, orcafs cold and warm, local");
    let ls = repeated(rounds, &what, || bench.large_ls());
    large_rows(report, &ls, large);
    let what = format!("first names of a cold {large}-object directory; one LIST page");
    let first = repeated(rounds, &what, || bench.first_names());
    first_rows(report, &first, large);
    let what = format!("find, du -s, ls -R of {tree_dirs} x {per_dir} objects");
    let tree = repeated(rounds, &what, || bench.tree());
    tree_rows(report, &tree, (tree_dirs, per_dir));
    let what = format!("ls -l of {page} objects: plain LIST, orcafs cold and warm, local");
    let pages = repeated(rounds, &what, || {
        Ok((bench.page_baselines()?, bench.page_ls(Fs::Orcafs)?))
    });
    page_rows(report, &pages, page)
}

fn large_rows(report: &mut Report, ls: &Result<Vec<dirs::LargeLs>>, n: usize) {
    let cold = format!("8. `ls -l` of a {n}-object directory, cold (fresh mount)");
    let warm = "9. The same `ls -l` again, within the metadata TTL".to_string();
    let requests = "9b. Origin requests during that warm `ls -l` (most of any round)";
    let (cold_t, warm_t) = (Target::RatioAtMost(1.5), Target::RatioAtMost(2.0));
    let Some(v) = report.ok_or_fail(ls, &[(&cold, cold_t), (&warm, warm_t)]) else {
        return;
    };
    let pages = n.div_ceil(1000);
    report.rows.push(Row::compared(
        &cold,
        Quantity::Millis(med_ms(v, |r| r.cold)),
        Quantity::Millis(med_ms(v, |r| r.plain_list)),
        &format!("plain paginated LIST, {pages} pages"),
        cold_t,
    ));
    report.rows.push(Row::compared(
        &warm,
        Quantity::Millis(med_ms(v, |r| r.warm)),
        Quantity::Millis(med_ms(v, |r| r.local)),
        "local directory, page cache warm",
        warm_t,
    ));
    let most = v.iter().map(|r| r.warm_requests).max().unwrap_or(0);
    report.rows.push(Row::alone(
        requests,
        Quantity::Count(most as f64),
        Target::ValueAtMost(0.0),
    ));
    report.details.push(format!(
        "`ls -l` of {n} objects, rounds (ms): orcafs cold {}; plain LIST {}; orcafs warm {}; \
         local {}. Origin requests during the cold `ls -l` (all = LIST + HEAD + GET + other): \
         {}. During the warm one: {}.",
        listed_ms(v, |r| r.cold),
        listed_ms(v, |r| r.plain_list),
        listed_ms(v, |r| r.warm),
        listed_ms(v, |r| r.local),
        v.iter()
            .map(|r| {
                let [all, list, head, get] = r.cold_requests;
                format!(
                    "{all} = {list} + {head} + {get} + {}",
                    all.saturating_sub(list + head + get)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        v.iter()
            .map(|r| r.warm_requests.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
}

fn first_rows(report: &mut Report, first: &Result<Vec<dirs::FirstNames>>, n: usize) {
    let metric = format!(
        "10. First names of a cold {n}-object directory (`stat`, then `os.scandir` to its first entry)"
    );
    let target = Target::RatioAtMost(3.0);
    let Some(v) = report.ok_or_fail(first, &[(&metric, target)]) else {
        return;
    };
    report.rows.push(Row::compared(
        &metric,
        Quantity::Millis(med_ms(v, |r| r.lookup + r.first)),
        Quantity::Millis(med_ms(v, |r| r.plain_page)),
        "one plain LIST page of 1000 keys",
        target,
    ));
    report.details.push(format!(
        "First names, rounds (ms): orcafs {} (of which the directory's `stat`: {}); one plain \
         LIST page {}.",
        listed_ms(v, |r| r.lookup + r.first),
        listed_ms(v, |r| r.lookup),
        listed_ms(v, |r| r.plain_page),
    ));
}

fn tree_rows(report: &mut Report, tree: &Result<Vec<dirs::TreeRound>>, shape: (usize, usize)) {
    let (dirs, per_dir) = shape;
    let name = |walk: Walk, when: &str| {
        format!(
            "11. `{}` of a tree of {dirs} directories x {per_dir} objects, {when}",
            walk.shown()
        )
    };
    let what = name(Walk::Find, "cold and warm");
    let Some(v) = report.ok_or_fail(tree, &[(&what, Target::None)]) else {
        return;
    };
    let plain = med_ms(v, |r| r.plain_lists);
    let mut details = vec![format!(
        "plain LISTs of the tree's root and of each of its {dirs} directories, summed, {}",
        listed_ms(v, |r| r.plain_lists)
    )];
    for walk in Walk::ALL {
        let of = |r: &dirs::TreeRound| r.walks.iter().find(|(w, _)| *w == walk).map(|(_, t)| *t);
        let runs: Vec<dirs::TreeWalk> = v.iter().filter_map(of).collect();
        report.rows.push(Row::compared(
            &name(walk, "cold (fresh mount)"),
            Quantity::Millis(med_ms(&runs, |t| t.cold)),
            Quantity::Millis(plain),
            "plain LISTs of every directory",
            Target::None,
        ));
        report.rows.push(Row::compared(
            &name(walk, "warm"),
            Quantity::Millis(med_ms(&runs, |t| t.warm)),
            Quantity::Millis(med_ms(&runs, |t| t.local)),
            "local copy, page cache warm",
            Target::None,
        ));
        details.push(format!(
            "`{}` orcafs cold {}, warm {}, local {}",
            walk.shown(),
            listed_ms(&runs, |t| t.cold),
            listed_ms(&runs, |t| t.warm),
            listed_ms(&runs, |t| t.local),
        ));
    }
    report
        .details
        .push(format!("Tree walks, ms per round: {}.", details.join("; ")));
}

type PageRounds = Result<Vec<(PageBaselines, PageLs)>>;

fn page_rows(report: &mut Report, pages: &PageRounds, n: usize) -> Option<PageMedians> {
    let cold = format!("12. `ls -l` of a {n}-object directory, cold (fresh mount)");
    let warm = "12b. The same `ls -l` again, within the metadata TTL".to_string();
    let v = report.ok_or_fail(pages, &[(&cold, Target::None), (&warm, Target::None)])?;
    let m = PageMedians {
        plain_page_ms: med_ms(v, |r| r.0.plain_page),
        local_ms: med_ms(v, |r| r.0.local),
        cold_ms: med_ms(v, |r| r.1.cold),
        warm_ms: med_ms(v, |r| r.1.warm),
        warm_requests: v.iter().map(|r| r.1.warm_requests).max().unwrap_or(0),
    };
    report.rows.push(Row::compared(
        &cold,
        Quantity::Millis(m.cold_ms),
        Quantity::Millis(m.plain_page_ms),
        "one plain LIST page",
        Target::None,
    ));
    report.rows.push(Row::compared(
        &warm,
        Quantity::Millis(m.warm_ms),
        Quantity::Millis(m.local_ms),
        "local directory, page cache warm",
        Target::None,
    ));
    report.details.push(format!(
        "`ls -l` of {n} objects, rounds (ms): orcafs cold {}, warm {} (origin requests when \
         warm: {}); plain LIST {}; local {}.",
        listed_ms(v, |r| r.1.cold),
        listed_ms(v, |r| r.1.warm),
        v.iter()
            .map(|r| r.1.warm_requests.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        listed_ms(v, |r| r.0.plain_page),
        listed_ms(v, |r| r.0.local),
    ));
    Some(m)
}

/// Row 13: cold read with a stalled shared store, and that mount's peak RSS.
pub fn measure_shared_stall(bench: &mut Bench, report: &mut Report) {
    let rounds = bench.knobs.repeat.min(3);
    let what = "orcafs cold read without a shared store, then with a stalled one";
    let v = repeated(rounds, what, || bench.shared_stall());
    if let Err(e) = bench.forget_cache(Fs::Orcafs) {
        report
            .details
            .push(format!("Could not delete a cache directory: {e}"));
    }
    stall_rows(report, &v);
}

fn stall_rows(report: &mut Report, v: &Result<Vec<StallRound>>) {
    let metric = "13. Cold sequential read, shared cache store hung (its proxy SIGSTOPped)";
    let rss = "13b. Peak RSS of that mount (one reader)";
    let target = Target::RatioAtLeast(0.9);
    let Some(v) = report.ok_or_fail(v, &[(metric, target), (rss, Target::None)]) else {
        return;
    };
    report.rows.push(Row::compared(
        metric,
        Quantity::MibPerSec(median_of(v.iter().map(|r| r.stalled.mibps))),
        Quantity::MibPerSec(median_of(v.iter().map(|r| r.without.mibps))),
        "no shared store",
        target,
    ));
    let mib = |b: u64| b as f64 / MIB as f64;
    report.rows.push(Row::compared(
        rss,
        Quantity::Mib(median_of(v.iter().map(|r| mib(r.stalled.hwm_bytes)))),
        Quantity::Mib(median_of(v.iter().map(|r| mib(r.without.hwm_bytes)))),
        "no shared store",
        Target::None,
    ));
    report.details.push(format!(
        "Stalled shared store, rounds (MiB/s): without a store {}; with the hung store {}. \
         Peak RSS (MiB): without {}; with {}.",
        listed(v.iter().map(|r| r.without.mibps)),
        listed(v.iter().map(|r| r.stalled.mibps)),
        listed(v.iter().map(|r| mib(r.without.hwm_bytes))),
        listed(v.iter().map(|r| mib(r.stalled.hwm_bytes))),
    ));
}

/// The dirs module's TTL, for the setup line.
pub fn metadata_ttl() -> &'static str {
    dirs::METADATA_TTL
}
