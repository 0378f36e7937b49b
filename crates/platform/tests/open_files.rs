//! The limit on open files, in a test binary of its own: the test changes a limit of the whole
//! process.

use platform::open_files::raise_soft_limit;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// A container runtime may start the process with a soft limit of 1024 under a far higher hard
/// one; a server then fails to accept well below its connection cap. The soft limit is raised
/// to the hard one, and never lowered.
#[test]
fn the_soft_limit_on_open_files_is_raised_to_the_hard_limit() {
    let start = getrlimit(Resource::Nofile);
    let hard = start.maximum;
    let low = hard.map_or(256, |hard| hard.min(256));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(low),
            maximum: hard,
        },
    )
    .expect("lower the soft limit");

    let limit = raise_soft_limit();
    assert_eq!(limit.before, Some(low));
    assert_eq!(limit.now, hard);
    assert_eq!(getrlimit(Resource::Nofile).current, hard);

    // Already at the hard limit: nothing changes.
    let again = raise_soft_limit();
    assert_eq!((again.before, again.now), (hard, hard));
}
