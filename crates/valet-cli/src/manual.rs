//! The man pages: `valet.1` and one page per subcommand (`valet-token-request.1`, …), each with
//! the ENVIRONMENT and EXIT STATUS sections clap does not write, so every page another links to
//! exists.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::arguments::Arguments;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBVALET_SERVER\fR
The valetd address (default http://127.0.0.1:7470); https:// is TLS.
.TP
\fBVALET_KEY\fR
The principal key (development and simple setups).
.TP
\fBVALET_IDENTITY_TOKEN_FILE\fR
A file holding a workload identity token (Kubernetes projected token, SPIFFE JWT-SVID), re-read as it rotates.
.TP
\fBACTIONS_ID_TOKEN_REQUEST_URL\fR, \fBACTIONS_ID_TOKEN_REQUEST_TOKEN\fR
Inside GitHub Actions: the runner's OIDC endpoint, asked for a token with audience \fBVALET_IDENTITY_AUDIENCE\fR (default valet).
.TP
\fBVALET_CA_FILE\fR, \fBVALET_CLIENT_CERT\fR, \fBVALET_CLIENT_KEY\fR
TLS: the CA that verifies valetd, and a client certificate and key for mTLS.
.TP
\fBNO_COLOR\fR
Turns colour off.
"#;

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
ok
.TP
\fB1\fR
failure
.TP
\fB2\fR
usage: a wrong argument, or no credential
.TP
\fB3\fR
denied: valetd refused the request, or the token is inactive or invalid
.TP
\fB4\fR
unreachable, or valetd refused to act without a durable record
.TP
\fB141\fR
stdout was closed by its reader (as after SIGPIPE)
.PP
\fBvalet exec\fR exits with its command's status instead (126 cannot run, 127 not found, 128+N ended by signal N).
"#;

/// Prints `valet.1`, or writes every page into `out_dir`; returns the exit code.
pub fn man_pages(out_dir: Option<&Path>) -> anyhow::Result<i32> {
    let mut command = Arguments::command().disable_help_subcommand(true);
    command.build();
    match out_dir {
        None => {
            let page = render(&command)?;
            std::io::stdout().write_all(&page)?;
        }
        Some(directory) => {
            std::fs::create_dir_all(directory)?;
            let mut written = 0;
            write_all(&command, directory, &mut written)?;
            eprintln!("wrote {written} pages to {}", directory.display());
        }
    }
    Ok(0)
}

fn render(command: &clap::Command) -> anyhow::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    page.extend_from_slice(ENVIRONMENT.as_bytes());
    page.extend_from_slice(EXIT_STATUS.as_bytes());
    Ok(page)
}

fn write_all(command: &clap::Command, directory: &Path, written: &mut usize) -> anyhow::Result<()> {
    let man = clap_mangen::Man::new(command.clone());
    std::fs::write(directory.join(man.get_filename()), render(command)?)?;
    *written += 1;
    for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_all(subcommand, directory, written)?;
    }
    Ok(())
}
