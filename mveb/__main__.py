from mveb.cli import main

raise SystemExit(main())
