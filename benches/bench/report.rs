//! The report: one table row per scenario and system, printed as Markdown.

use std::collections::HashMap;

use crate::servers::{CpuUse, System};

/// One row of the report.
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) system: System,
    pub(crate) result: String,
    pub(crate) latency: String,
    pub(crate) lost: String,
    pub(crate) dup: String,
    pub(crate) cpu: String,
    pub(crate) goal: String,
    pub(crate) met: String,
}

impl Row {
    /// A raw baseline's figure under the row of the system it is compared with: only a
    /// result, no measurement of loss, duplicates or CPU.
    pub(crate) fn raw_figure(result: String) -> Row {
        Row {
            scenario: String::new(),
            system: System::Raw,
            result,
            latency: "–".into(),
            lost: "–".into(),
            dup: "–".into(),
            cpu: "–".into(),
            goal: String::new(),
            met: String::new(),
        }
    }
}

/// The CPU cell: server / load tool.
pub(crate) fn cpu_cell(cpu: &CpuUse) -> String {
    format!("{:.0}% / {:.0}%", cpu.server, cpu.tool)
}

pub(crate) fn closed_note(closed: u64) -> String {
    if closed > 0 {
        format!(" ({closed} closed)")
    } else {
        String::new()
    }
}

pub(crate) fn yes(b: bool) -> String {
    if b { "met" } else { "NOT met" }.into()
}

pub(crate) fn print_table(rows: &[Row]) {
    println!("| scenario | system | result | latency | lost | dup | CPU server / load tool | goal | met |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut last = String::new();
    let mut by: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        *by.entry(r.scenario.as_str()).or_default() += 1;
        let scenario = if r.scenario == last {
            ""
        } else {
            r.scenario.as_str()
        };
        last = r.scenario.clone();
        println!(
            "| {scenario} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.system.name(),
            r.result,
            r.latency,
            r.lost,
            r.dup,
            r.cpu,
            r.goal,
            r.met
        );
    }
}

/// The systems of a scenario with the raw baseline first, so that wsbridge's row can be judged
/// against the raw figure of the same run ([`in_table_order`] puts the rows back).
pub(crate) fn raw_first(systems: &[System]) -> Vec<System> {
    let mut ordered = systems.to_vec();
    ordered.sort_by_key(|s| *s != System::Raw);
    ordered
}

/// Rows back in the order the systems were asked for.
pub(crate) fn in_table_order(systems: &[System], mut rows: Vec<Row>) -> Vec<Row> {
    rows.sort_by_key(|r| systems.iter().position(|s| *s == r.system));
    rows
}
