//! `bctl`: pgBalancer's command-line client.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pgbalancer_controller::bctl::Bctl;

fn main() -> ExitCode {
    match Bctl::parse().run() {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bctl: {e}");
            ExitCode::FAILURE
        }
    }
}
