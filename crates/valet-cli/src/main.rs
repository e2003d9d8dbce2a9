//! `valet`: parses arguments, runs one command, prints errors as one sentence plus a hint, and
//! exits with 0 ok, 1 failure, 2 usage, 3 denied, 4 unreachable; a closed stdout (`| head`)
//! ends it quietly with 141, as SIGPIPE would.

mod arguments;
mod commands;
mod exec;
mod manual;
mod output;
mod waiting;
mod watching;

use clap::Parser;

fn main() {
    output::end_quietly_on_a_closed_stdout();
    let arguments = arguments::Arguments::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("valet: cannot start the async runtime: {error}");
            std::process::exit(output::EXIT_FAILURE);
        }
    };
    let code = match runtime.block_on(commands::run(arguments)) {
        Ok(code) => code,
        Err(error) if output::is_closed_stdout(&error) => output::EXIT_CLOSED_STDOUT,
        Err(error) => {
            eprint!("{}", output::render_error(&error));
            output::exit_code_of(&error)
        }
    };
    std::process::exit(code);
}
