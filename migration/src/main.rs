//! `cargo run -p migration -- …` was the migration CLI. It moved into the broker, as
//! `co2-broker migrate up|down|status [--steps N]`, so that it reads its settings (and the
//! database URL) through the broker's own loader; a binary here cannot, since the broker
//! depends on this crate. This stub points there instead of failing with "no bin target".

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let args = if args.is_empty() {
        "up|down|status".into()
    } else {
        args
    };
    eprintln!(
        "the migration CLI moved into the broker: run `co2-broker migrate {args}` \
         (from the source tree: `cargo run -- migrate {args}`); see README.md, \"Migrations\""
    );
    ExitCode::from(2)
}
